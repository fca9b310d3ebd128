"""mra-run and mra-chat: parse arguments, call the Pipeline, turn every error into one line.

  mra-run --bundle B --image IMG --prompt "..."          stream the answer to stdout
  mra-run --bundle B --image IMG --prompt "..." --json   answer + timings as one JSON object
  mra-run --bundle B --images DIR --prompt "..." --out answers.jsonl   a folder, resumable
  mra-run --bundle B --image IMG --prompt "..." --json-schema schema.json   the answer as JSON
  mra-chat --bundle B [--image IMG]                      interactive: /image PATH, /reset, /quit
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import fcntl
import json
import logging
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from mra.core.errors import MraError, cli_logging, run_cli

from .llama_enums import KV_TYPES
from .preprocess import IMAGE_SUFFIXES, check_image_file, image_files
from .prompt import check_text


def _positive(kind: type, name: str):
    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} | got {text!r}, expected a number") from None
        if v <= 0:
            raise argparse.ArgumentTypeError(f"{name} | got {text}, expected > 0")
        return v
    return parse


def _number(name: str, low: float, low_open: bool, high: float = math.inf):
    """A finite float in [low, high] (or (low, high]): nan and inf are refused here, not later."""
    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} | got {text!r}, expected a number") from None
        if not math.isfinite(v) or v < low or (low_open and v == low) or v > high:
            raise argparse.ArgumentTypeError(f"{name} | got {text}, expected a finite number "
                                             f"{'>' if low_open else '>='} {low:g}" + (f" and <= {high:g}"
                                                                                         if high < math.inf else ""))
        return v
    return parse


def _add_pipeline_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bundle", type=Path, required=True, help="bundle directory (with mra.json)")
    g = p.add_argument_group("runtime")
    g.add_argument("--vision", default="auto",
                   help="vision backend/precision: auto (default), onnxruntime, int8, onnx:fp16, ...")
    g.add_argument("--llm-quant", help="GGUF type to use when the bundle has several (default: Q4_K_M if present)")
    g.add_argument("--n-ctx", type=_positive(int, "--n-ctx"), help="context length (default: the model's)")
    g.add_argument("--threads", type=_positive(int, "--threads"), help="CPU threads (default: like llama-cpp-python)")
    g.add_argument("--n-gpu-layers", type=int, default=0, help="LLM layers to offload to the GPU (-1: all)")
    g.add_argument("--kv-type", choices=tuple(KV_TYPES), default="f16", help="KV cache type (default f16)")
    g.add_argument("--no-hash", action="store_true",
                   help="check artifact sizes only, skip sha256 (saves seconds on multi-GB files)")
    g.add_argument("--exif-transpose", action="store_true", help="apply EXIF orientation (camera photos)")
    g.add_argument("--prompt-cache", type=Path, help="folder of saved image-prefix KV states: a later run on the "
                   "same image skips its vision and prefill (issue 12)")
    b = p.add_argument_group("image budget (a bundle of several input sizes; docs/resolution.md)")
    b.add_argument("--max-image-tokens", type=_positive(int, "--max-image-tokens"),
                   help="the most image rows an image may cost the LLM: the largest size that fits runs")
    b.add_argument("--vision-budget-ms", type=_number("--vision-budget-ms", 0, True),
                   help="the most vision milliseconds (as the export recorded them) an image may take")
    s = p.add_argument_group("generation")
    s.add_argument("--max-tokens", type=_positive(int, "--max-tokens"), default=256)
    s.add_argument("--temperature", type=_number("--temperature", 0, False), default=0.0,
                   help="0 (default): greedy")
    s.add_argument("--top-p", type=_number("--top-p", 0, True, 1), default=1.0, help="in (0, 1]; 1 (default): off")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--stop", action="append", default=[], help="stop string (repeatable); </s> always stops")
    p.add_argument("--timings", action="store_true",
                   help="print the timings of each answer to stderr (preprocess, vision, prefill, TTFT, decode)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar or folder summary")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging (llama.cpp too) and tracebacks")


def _open_pipeline(a: argparse.Namespace):
    from .pipeline import Pipeline

    return Pipeline.from_bundle(a.bundle, vision=a.vision, llm_quant=a.llm_quant, n_ctx=a.n_ctx,
                                n_threads=a.threads, n_gpu_layers=a.n_gpu_layers, kv_type=a.kv_type,
                                verify_hash=not a.no_hash, exif_transpose=a.exif_transpose,
                                prompt_cache=a.prompt_cache)


def _gen_kwargs(a: argparse.Namespace) -> dict:
    kw = dict(max_tokens=a.max_tokens, temperature=a.temperature, top_p=a.top_p, seed=a.seed, stop=a.stop,
              **_budget(a))
    if getattr(a, "json_schema", None) is not None:  # issue 12: mra-run --json-schema FILE
        kw["json_schema"] = a.json_schema if isinstance(a.json_schema, dict) else _read_schema(a.json_schema)
    return kw


def _budget(a: argparse.Namespace) -> dict:
    return dict(max_image_tokens=a.max_image_tokens, vision_budget_ms=a.vision_budget_ms)


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
    _add_pipeline_args(p)
    return p


def _run(argv: list[str]) -> int:
    a = run_parser().parse_args(argv)
    check_text(a.prompt, "--prompt")
    if a.images is not None and a.out is None:
        raise MraError("--images | needs --out answers.jsonl (the folder run writes one JSON line per image)")
    if a.json_schema is not None:  # issue 12: read and check it before loading anything
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
            with _open_pipeline(a) as pipe:
                return _run_folder(pipe, a, images, log)
    with _open_pipeline(a) as pipe:
        if a.json:
            answer = pipe.ask(a.image, a.prompt, **_gen_kwargs(a))
            print(json.dumps({"image": str(a.image), "prompt": a.prompt, "answer": answer,
                              "timings": pipe.timings.as_dict()}, ensure_ascii=False))
        else:
            _write_stream(pipe.ask(a.image, a.prompt, stream=True, **_gen_kwargs(a)))
            if a.timings:
                print(f"[{pipe.timings.summary()}]", file=sys.stderr)
    return 0


def image_name(path: Path, folder: Path) -> str:
    """The image's name in the results: its path under the folder; bytes that are not UTF-8 (a
    file name from another system) are written as \\xNN escapes, the same on every run."""
    return os.fsencode(path.relative_to(folder)).decode("utf-8", "backslashreplace").replace(os.sep, "/")


MAX_ATTEMPTS = 2  # an image that failed is retried by one rerun, not forever


def is_record(d: object) -> bool:
    """Whether ``d`` is a line mra-run writes (or an app on its resume rule, e.g.
    examples/caption_folder.py, which adds fields): image, prompt, and an answer or an error."""
    return (isinstance(d, dict) and isinstance(d.get("image"), str)
            and isinstance(d.get("prompt"), str)
            and (isinstance(d.get("answer"), str) or isinstance(d.get("error"), str)))


@dataclass
class ResultLog:
    """The JSON-lines results of a folder run, resumable: only a file whose every complete line
    is an mra-run record is appended to; a trailing partial record (an interrupted write) is
    cut; anything else is refused, so a notes file or a photo passed as --out stays untouched."""
    path: Path
    answered: set[tuple[str, str]]
    failures: collections.Counter

    @classmethod
    def open(cls, path: Path) -> "ResultLog":
        answered: set[tuple[str, str]] = set()
        failures: collections.Counter = collections.Counter()
        if not path.exists() and not path.is_symlink():
            return cls(path, answered, failures)
        if not path.is_file():
            raise MraError(f"--out {path} | exists and is not a regular file; pass a .jsonl file name")
        keep = 0
        with open(path, "rb") as f:
            for n, line in enumerate(f, 1):
                complete = line.endswith(b"\n")
                try:
                    d = json.loads(line.decode("utf-8"))
                    ok = is_record(d)
                except (UnicodeDecodeError, json.JSONDecodeError):
                    ok = False
                if not complete and not ok and line.startswith(b'{"image": '):
                    break  # the last write was interrupted: drop this partial record
                if not ok or not complete:
                    raise MraError(f"--out {path} | line {n} is not a record written by mra-run: refusing to "
                                   "append to (or cut) a file this tool did not write; pass another --out")
                key = (d["image"], d["prompt"])
                if "answer" in d:
                    answered.add(key)
                else:
                    failures[key] += 1
                keep += len(line)
        if keep != path.stat().st_size:
            with open(path, "r+b") as f:
                f.truncate(keep)
            logging.getLogger("mra.runtime").warning("mra-run: dropped a partial last record of %s", path)
        return cls(path, answered, failures)

    def todo(self, key: tuple[str, str]) -> bool:
        return key not in self.answered and self.failures[key] < MAX_ATTEMPTS


@contextlib.contextmanager
def results_lock(out: Path) -> Iterator[None]:
    """An exclusive flock on the results file while a folder run reads and appends to it: a
    second run on the same file fails at once instead of interleaving or cutting its lines.
    (The kernel drops the lock with the process.)"""
    if (out.exists() or out.is_symlink()) and not out.is_file():
        raise MraError(f"--out {out} | exists and is not a regular file; pass a .jsonl file name")
    out.parent.mkdir(parents=True, exist_ok=True)
    created = not out.exists()
    try:
        with open(out, "ab") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                created = False
                raise MraError(f"--out {out} | another mra-run is writing it; wait for it or pass another "
                               "--out") from None
            yield
    except BaseException:
        if created and out.is_file() and out.stat().st_size == 0:
            out.unlink()  # made by this run, and nothing in it: no trace of a failed start
        raise


def answered(out: Path) -> set[tuple[str, str]]:
    """(image, prompt) pairs already answered in ``out``."""
    return ResultLog.open(out).answered


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
    _add_pipeline_args(p)
    return p


def _chat(argv: list[str]) -> int:
    a = chat_parser().parse_args(argv)
    interactive = sys.stdin.isatty()
    with _open_pipeline(a) as pipe:
        chat = pipe.chat()
        if a.image is not None:
            pipe.encode_image(a.image, **_budget(a))  # fail now, not at the first question
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
    argv = sys.argv[1:] if argv is None else argv
    verbose = "-v" in argv or "--verbose" in argv
    cli_logging(verbose)
    if not verbose:
        _quiet_onnxruntime()
    return run_cli(prog, body, argv, verbose)


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
