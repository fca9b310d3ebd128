"""mra-run and mra-chat: parse arguments, call the Pipeline, turn every error into one line.

  mra-run --bundle B --image IMG --prompt "..."          stream the answer to stdout
  mra-run --bundle B --image IMG --prompt "..." --json   answer + timings as one JSON object
  mra-run --bundle B --images DIR --prompt "..." --out answers.jsonl   a folder, resumable
  mra-run --bundle B --image IMG --prompt "..." --json-schema schema.json   the answer as JSON
  mra-chat --bundle B [--image IMG]                      interactive: /image PATH, /reset, /quit
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable, Iterator

from mra.core.arg_types import bounded, positive
from mra.core.errors import MraError, cli_main

from .cli_options import add_pipeline_args, open_pipeline
from .preprocess import IMAGE_SUFFIXES, check_image_file, image_files
from .prompt import check_text
from .result_log import MAX_ATTEMPTS, ResultLog, image_name, results_lock


def add_generation_args(p: argparse.ArgumentParser) -> None:
    """The sampling options of mra-run and mra-chat, and their output switches."""
    s = p.add_argument_group("generation")
    s.add_argument("--max-tokens", type=positive(int, "--max-tokens"), default=256)
    s.add_argument("--temperature", type=bounded("--temperature", 0, False), default=0.0,
                   help="0 (default): greedy")
    s.add_argument("--top-p", type=bounded("--top-p", 0, True, 1), default=1.0, help="in (0, 1]; 1 (default): off")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--stop", action="append", default=[], help="stop string (repeatable); </s> always stops")
    p.add_argument("--timings", action="store_true",
                   help="print the timings of each answer to stderr (preprocess, vision, prefill, TTFT, decode)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar or folder summary")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging (llama.cpp too) and tracebacks")


def _gen_kwargs(a: argparse.Namespace) -> dict:
    kw = dict(max_tokens=a.max_tokens, temperature=a.temperature, top_p=a.top_p, seed=a.seed, stop=a.stop)
    if getattr(a, "json_schema", None) is not None:  # mra-run --json-schema FILE
        kw["json_schema"] = a.json_schema if isinstance(a.json_schema, dict) else _read_schema(a.json_schema)
    return kw


def _read_schema(path: Path) -> dict:
    try:
        schema = json.loads(path.read_text())
    except OSError as e:
        raise MraError(f"--json-schema {path} | cannot read it ({e.strerror})") from None
    except json.JSONDecodeError as e:
        raise MraError(f"--json-schema {path} | not valid JSON ({e})") from None
    if not isinstance(schema, dict):
        raise MraError(f"--json-schema {path} | got a JSON {type(schema).__name__}, expected a schema object")
    return schema


def _write_stream(pieces: Iterator[str]) -> str:
    out = []
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
        out.append(piece)
    sys.stdout.write("\n")
    sys.stdout.flush()
    return "".join(out)


# --- mra-run ----------------------------------------------------------------------------
def run_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mra-run", description="Answer a question about an image (or a folder of "
                                "images) with a LLaVA-HR bundle: onnxruntime vision + llama.cpp, no torch.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--image", type=Path, help="one image")
    src.add_argument("--images", type=Path, help="a folder of images (needs --out)")
    p.add_argument("--prompt", required=True, help="the question")
    p.add_argument("--json", action="store_true", help="print {answer, timings} as JSON instead of streaming")
    p.add_argument("--out", type=Path, help="answers.jsonl for --images; a rerun skips images already in it")
    p.add_argument("--json-schema", type=Path, metavar="FILE",
                   help="a JSON schema file: the answer is JSON that follows it (llama.cpp's grammar sampler)")
    add_pipeline_args(p)
    add_generation_args(p)
    return p


def _run(argv: list[str]) -> int:
    a = run_parser().parse_args(argv)
    check_text(a.prompt, "--prompt")
    if a.images is not None and a.out is None:
        raise MraError("--images | needs --out answers.jsonl (the folder run writes one JSON line per image)")
    if a.json_schema is not None:  # read and check it before loading anything
        a.json_schema = _read_schema(a.json_schema)
    if a.image is not None:
        check_image_file(a.image)
    if a.images is not None:
        if not a.images.is_dir():
            raise MraError(f"--images {a.images} | not a directory")
        images = image_files(a.images)
        if not images:
            raise MraError(f"--images {a.images} | no image files ({', '.join(IMAGE_SUFFIXES)})")
        with results_lock(a.out):  # one folder run per results file
            log = ResultLog.open(a.out)  # refuses a file mra-run did not write, before loading the model
            with open_pipeline(a) as pipe:
                return _run_folder(pipe, a, images, log)
    with open_pipeline(a) as pipe:
        if a.json:
            answer = pipe.ask(a.image, a.prompt, **_gen_kwargs(a))
            print(json.dumps({"image": str(a.image), "prompt": a.prompt, "answer": answer,
                              "timings": pipe.timings.as_dict()}, ensure_ascii=False))
        else:
            _write_stream(pipe.ask(a.image, a.prompt, stream=True, **_gen_kwargs(a)))
            if a.timings:
                print(f"[{pipe.timings.summary()}]", file=sys.stderr)
    return 0


def _run_folder(pipe, a: argparse.Namespace, images: list[Path], results: ResultLog) -> int:
    from tqdm import tqdm

    a.out.parent.mkdir(parents=True, exist_ok=True)
    named = [(p, image_name(p, a.images)) for p in images]
    todo = [(p, n) for p, n in named if results.todo((n, a.prompt))]
    failed = 0
    with open(a.out, "a", encoding="utf-8") as f, tqdm(todo, desc="images", unit="img", disable=a.quiet,
                                                       file=sys.stderr) as bar:
        for path, name in bar:
            rec = {"image": name, "prompt": a.prompt}
            try:
                rec["answer"] = pipe.ask(path, a.prompt, **_gen_kwargs(a))
                rec["timings"] = pipe.timings.as_dict()
            except MraError as e:  # this image is bad: record it and go on with the others
                rec["error"] = str(e)
                failed += 1
                bar.write(f"mra-run: {name}: {e}", file=sys.stderr)
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            f.flush()
    if not a.quiet:
        gave_up = sum(1 for _, n in named if results.failures[(n, a.prompt)] >= MAX_ATTEMPTS)
        print(f"mra-run: {len(todo) - failed} answered, {len(images) - len(todo) - gave_up} already in {a.out}, "
              f"{failed} failed" + (f", {gave_up} skipped (failed {MAX_ATTEMPTS} times)" if gave_up else ""),
              file=sys.stderr)
    return 1 if failed else 0


# --- mra-chat ---------------------------------------------------------------------------
CHAT_HELP = "/image PATH  the next question goes with this image\n/reset       forget the conversation\n" \
            "/quit        leave (or Ctrl-D)"


def chat_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mra-chat", description="Chat about images with a LLaVA-HR bundle. "
                                "Commands: " + CHAT_HELP.replace("\n", "; "))
    p.add_argument("--image", type=Path, help="the image the first question goes with")
    add_pipeline_args(p)
    add_generation_args(p)
    return p


def _chat(argv: list[str]) -> int:
    a = chat_parser().parse_args(argv)
    interactive = sys.stdin.isatty()
    with open_pipeline(a) as pipe:
        chat = pipe.chat()
        if a.image is not None:
            pipe.encode_image(a.image)  # fail now, not at the first question
            chat.reset(a.image)
        if interactive:
            print(f"mra-chat: {a.bundle} ({pipe.vision.label}, {pipe.llm_artifact.file}). {CHAT_HELP}",
                  file=sys.stderr)
        while True:
            if interactive:
                sys.stdout.write("USER> ")
                sys.stdout.flush()
            try:
                line = _read_line()
            except UnicodeDecodeError as e:  # say so and keep chatting
                print(f"mra-chat: error: input | not valid UTF-8 ({e.reason} at byte {e.start}); type UTF-8 text",
                      file=sys.stderr)
                continue
            if line is None:
                break
            line = line.strip()
            if not line:
                continue
            try:
                if line.startswith("/"):
                    if _command(line, chat, pipe):
                        break
                    continue
                _write_stream(chat.ask(line, stream=True, **_gen_kwargs(a)))
                if a.timings:
                    print(f"[{pipe.timings.summary()}]", file=sys.stderr)
            except MraError as e:  # a bad image or an overlong chat: say so and keep chatting
                print(f"mra-chat: error: {e}", file=sys.stderr)
            except KeyboardInterrupt:  # Ctrl-C stops this answer (kept as far as it got); at the prompt it quits
                print("\n(interrupted)", file=sys.stderr)
    return 0


def _read_line() -> str | None:
    """The next stdin line, decoded as UTF-8 whatever the locale (None at the end)."""
    buffer = getattr(sys.stdin, "buffer", None)
    raw = buffer.readline() if buffer is not None else sys.stdin.readline()
    if not raw:
        return None
    return raw.decode("utf-8") if isinstance(raw, bytes) else raw


def _command(line: str, chat, pipe) -> bool:
    """Run a /command; True means quit."""
    cmd, _, arg = line.partition(" ")
    arg = arg.strip()
    if cmd in ("/quit", "/exit", "/q"):
        return True
    if cmd == "/reset":
        chat.reset()
        print("(conversation cleared)", file=sys.stderr)
    elif cmd == "/image":
        if not arg:
            raise MraError("/image | expected a path: /image PATH")
        path = Path(arg).expanduser()
        pipe.encode_image(path)  # check and cache it now
        chat.image = path
        print(f"(the next question goes with {path}; /reset forgets earlier turns)", file=sys.stderr)
    elif cmd == "/help":
        print(CHAT_HELP, file=sys.stderr)
    else:
        raise MraError(f"command | unknown {cmd!r}; try /help")
    return False


# --- entry points -----------------------------------------------------------------------
def _main(prog: str, body: Callable[[list[str]], int], argv: list[str] | None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if "-v" not in args and "--verbose" not in args:
        _quiet_onnxruntime()
    return cli_main(prog, body, argv)


def _quiet_onnxruntime() -> None:
    try:
        import onnxruntime

        onnxruntime.set_default_logger_severity(3)
    except ImportError:
        pass


def run_main(argv: list[str] | None = None) -> int:
    return _main("mra-run", _run, argv)


def chat_main(argv: list[str] | None = None) -> int:
    return _main("mra-chat", _chat, argv)


if __name__ == "__main__":
    sys.exit(run_main())
