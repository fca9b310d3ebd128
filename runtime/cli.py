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
    p.add_argument("--prompt", help="the question (with --video: one more --question)")
    p.add_argument("--json", action="store_true", help="print {answer, timings} as JSON instead of streaming")
    p.add_argument("--out", type=Path, help="answers.jsonl for --images; a rerun skips images already in it")
    p.add_argument("--json-schema", type=Path, metavar="FILE",
                   help="a JSON schema file: the answer is JSON that follows it (enforced by llguidance)")
    _add_video_args(p, src)
    add_pipeline_args(p)
    add_generation_args(p)
    return p


def _add_video_args(p: argparse.ArgumentParser, src) -> None:
    """mra-run --video: the watch mode (mra.runtime.watch), one JSON line per event."""
    src.add_argument("--video", metavar="SOURCE", help="a video file, a camera index (0), an RTSP/HTTP URL or a "
                     "GStreamer pipeline ending in appsink: one JSON line per decision, the summary last")
    g = p.add_argument_group("video (--video)")
    g.add_argument("--question", action="append", default=[], help="a question about each frame sent to the "
                   "model (repeatable; --prompt counts as one)")
    g.add_argument("--change-threshold", type=bounded("--change-threshold", 0, False), default=None,
                   help="mean grey-level difference (0-255) of the small blurred frame from the one last sent "
                   "that counts as a change (default 6: sensor noise measures about 1)")
    g.add_argument("--every", type=bounded("--every", 0, False), default=0.0, metavar="SECONDS",
                   help="send frames at most this often (stream seconds; default 0)")
    g.add_argument("--max-interval", type=bounded("--max-interval", 0, True), metavar="SECONDS",
                   help="a fresh look at least this often, changed or not (default: only on change)")
    g.add_argument("--on-change-only", action="store_true",
                   help="print an answer only when it differs from that question's last one; no skip lines")
    g.add_argument("--realtime", action="store_true",
                   help="play a file at its frame rate like a camera (newest frame only; default: every frame)")
    g.add_argument("--read-timeout", type=bounded("--read-timeout", 0, True), default=None, metavar="SECONDS",
                   help="no frame for this long: a 'stalled' event (default 10)")
    g.add_argument("--reconnect", type=int, default=0, metavar="N",
                   help="a live source that stalls or drops: reopen it up to N times in a row, after 0.5, 1, "
                   "2, ... s (default 0: end)")


def _run(argv: list[str]) -> int:
    a = run_parser().parse_args(argv)
    if a.video is None and a.prompt is None:
        raise MraError("--prompt | missing; pass the question: --prompt \"What is in the image?\"")
    if a.prompt is not None:
        check_text(a.prompt, "--prompt")
    if a.images is not None and a.out is None:
        raise MraError("--images | needs --out answers.jsonl (the folder run writes one JSON line per image)")
    if a.json_schema is not None:  # read and check it before loading anything
        a.json_schema = _read_schema(a.json_schema)
    if a.video is not None:
        return _run_video(a)
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


def _run_video(a: argparse.Namespace) -> int:
    """Exit 0 when a file ended, 1 when a live source stalled or dropped for good, 130 on Ctrl-C."""
    if a.json or a.out is not None:
        raise MraError(f"{'--json' if a.json else '--out'} | not used with --video: its output is already one JSON "
                       "line per event on stdout; redirect it to a file")
    questions = [*([a.prompt] if a.prompt is not None else []), *a.question]
    if not questions:
        raise MraError("--video | no question; pass --question \"Is anyone at the door?\" (repeatable)")
    for q in a.question:
        check_text(q, "--question")
    if a.reconnect < 0:
        raise MraError(f"--reconnect | got {a.reconnect}, expected an integer >= 0")
    options = {k: v for k, v in (("change_threshold", a.change_threshold), ("read_timeout", a.read_timeout))
               if v is not None}
    with open_pipeline(a) as pipe:
        w = pipe.watch(a.video, questions, every=a.every, max_interval=a.max_interval,
                       on_change_only=a.on_change_only, realtime=True if a.realtime else None,
                       reconnect=a.reconnect, **options, **_gen_kwargs(a))
        try:
            for event in w:
                print(json.dumps(event.as_dict(), ensure_ascii=False), flush=True)
        except KeyboardInterrupt:  # the normal end of a camera: the summary, then exit 130
            w.close()
            w.summary.ended = "interrupted"
            print(json.dumps(w.summary.as_dict()), flush=True)
            raise
    return 0 if w.summary.ended == "ended" else 1


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
            pipe.encode_image(a.image)  # the default budget; fail now, not at the first question
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
