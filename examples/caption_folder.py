"""Caption every image of a folder into a JSONL file, one line per image.

Run it again after an interruption (Ctrl-C, a reboot) and it continues where it stopped:
images already in the file are skipped, and a line cut in the middle is dropped.

    python examples/caption_folder.py --bundle BUNDLE --images photos/ --out captions.jsonl

Each line: {"image": "sub/dir/a.jpg", "prompt": ..., "answer": "A cat on a chair.", "seconds": 1.9}
(the same records as `mra-run --images`, so either tool can continue the other's file).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from mra.core.errors import MraError, cli_main
from mra.runtime.cli_options import add_pipeline_args, open_pipeline
from mra.runtime.preprocess import image_files
from mra.runtime.result_log import answered  # the resume rule of `mra-run --images`: complete lines only

PROMPT = "Describe this image in one sentence."


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_pipeline_args(p)  # --bundle and every Pipeline option, as mra-run has them
    p.add_argument("--images", type=Path, required=True, help="folder of images (searched recursively)")
    p.add_argument("--out", type=Path, required=True, help="JSONL file to append to (created if missing)")
    p.add_argument("--prompt", default=PROMPT, help=f"question asked of every image (default: {PROMPT!r})")
    p.add_argument("--max-tokens", type=int, default=64, help="longest caption, in tokens (default 64)")
    a = p.parse_args(argv)

    images = image_files(a.images)
    if not images:
        raise MraError(f"--images {a.images} | no image files; expected a folder of photos")
    done = answered(a.out)  # (image, prompt) pairs already captioned
    todo = [i for i in images if (i.relative_to(a.images).as_posix(), a.prompt) not in done]
    print(f"{len(images)} images, {len(images) - len(todo)} already in {a.out}", file=sys.stderr)
    if not todo:
        return 0
    a.out.parent.mkdir(parents=True, exist_ok=True)
    failed = 0
    with open_pipeline(a) as pipe, open(a.out, "a", encoding="utf-8") as f:
        for n, path in enumerate(todo, 1):
            name = path.relative_to(a.images).as_posix()
            t0 = time.perf_counter()
            try:
                caption = pipe.ask(path, a.prompt, max_tokens=a.max_tokens)
            except MraError as e:  # a damaged file: say so and go on with the others
                print(f"{name}: {e}", file=sys.stderr)
                failed += 1
                continue
            rec = {"image": name, "prompt": a.prompt, "answer": caption,
                   "seconds": round(time.perf_counter() - t0, 3)}
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            f.flush()  # one complete line per image: what an interrupted run leaves is resumable
            print(f"[{n}/{len(todo)}] {name}: {caption}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":  # one line for a user error (no bundle, a missing folder), as mra-run
    sys.exit(cli_main("caption_folder", main, None))
