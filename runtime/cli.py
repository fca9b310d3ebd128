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
import logging
import os
import sys
from pathlib import Path
from typing import Callable, Iterator

from .errors import MraError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
KV_CHOICES = ("f16", "f32", "q8_0", "q4_0")


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


def _add_pipeline_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bundle", type=Path, required=True, help="bundle directory (with mra.json)")
    g = p.add_argument_group("runtime")
    g.add_argument("--vision", default="auto",
                   help="vision backend/precision: auto (default), onnxruntime, int8, onnx:fp16, ...")
    g.add_argument("--llm-quant", help="GGUF type to use when the bundle has several (default: Q4_K_M if present)")
    g.add_argument("--n-ctx", type=_positive(int, "--n-ctx"), help="context length (default: the model's)")
    g.add_argument("--threads", type=_positive(int, "--threads"), help="CPU threads (default: like llama-cpp-python)")
    g.add_argument("--n-gpu-layers", type=int, default=0, help="LLM layers to offload to the GPU (-1: all)")
    g.add_argument("--kv-type", choices=KV_CHOICES, default="f16", help="KV cache type (default f16)")
    g.add_argument("--no-hash", action="store_true",
                   help="check artifact sizes only, skip sha256 (saves seconds on multi-GB files)")
    g.add_argument("--exif-transpose", action="store_true", help="apply EXIF orientation (camera photos)")
    g.add_argument("--prompt-cache", type=Path, help="folder of saved image-prefix KV states: a later run on the "
                   "same image skips its vision and prefill (issue 12)")
    s = p.add_argument_group("generation")
    s.add_argument("--max-tokens", type=_positive(int, "--max-tokens"), default=256)
    s.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy")
    s.add_argument("--top-p", type=float, default=1.0)
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
    kw = dict(max_tokens=a.max_tokens, temperature=a.temperature, top_p=a.top_p, seed=a.seed, stop=a.stop)
    if getattr(a, "json_schema", None) is not None:  # issue 12: mra-run --json-schema FILE
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
    _add_pipeline_args(p)
    return p


def _run(argv: list[str]) -> int:
    a = run_parser().parse_args(argv)
    if a.images is not None and a.out is None:
        raise MraError("--images | needs --out answers.jsonl (the folder run writes one JSON line per image)")
    if a.image is not None and not a.image.is_file():
        raise MraError(f"image {a.image} | file not found")
    if a.images is not None and not a.images.is_dir():
        raise MraError(f"--images {a.images} | not a directory")
    if a.json_schema is not None:  # issue 12: read and check it before loading anything
        a.json_schema = _read_schema(a.json_schema)
    with _open_pipeline(a) as pipe:
        if a.images is not None:
            return _run_folder(pipe, a)
        if a.json:
            answer = pipe.ask(a.image, a.prompt, **_gen_kwargs(a))
            print(json.dumps({"image": str(a.image), "prompt": a.prompt, "answer": answer,
                              "timings": pipe.timings.as_dict()}, ensure_ascii=False))
        else:
            _write_stream(pipe.ask(a.image, a.prompt, stream=True, **_gen_kwargs(a)))
            if a.timings:
                print(f"[{pipe.timings.summary()}]", file=sys.stderr)
    return 0


def folder_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def answered(out: Path) -> set[tuple[str, str]]:
    """(image, prompt) pairs already answered in ``out``; a line cut by an interrupted run is dropped."""
    done: set[tuple[str, str]] = set()
    if not out.is_file():
        return done
    data = out.read_bytes()
    if data and not data.endswith(b"\n"):  # the last write was interrupted: cut the partial line
        with open(out, "r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)
        data = data[:data.rfind(b"\n") + 1]
    for line in data.decode("utf-8", "replace").splitlines():
        try:
            d = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(d, dict) and "answer" in d and "image" in d:
            done.add((d["image"], d.get("prompt", "")))
    return done


def _run_folder(pipe, a: argparse.Namespace) -> int:
    from tqdm import tqdm

    images = folder_images(a.images)
    if not images:
        raise MraError(f"--images {a.images} | no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    done = answered(a.out)
    todo = [p for p in images if (p.relative_to(a.images).as_posix(), a.prompt) not in done]
    failed = 0
    with open(a.out, "a", encoding="utf-8") as f, tqdm(todo, desc="images", unit="img", disable=a.quiet,
                                                       file=sys.stderr) as bar:
        for path in bar:
            rec = {"image": path.relative_to(a.images).as_posix(), "prompt": a.prompt}
            try:
                rec["answer"] = pipe.ask(path, a.prompt, **_gen_kwargs(a))
                rec["timings"] = pipe.timings.as_dict()
            except MraError as e:
                rec["error"] = str(e)
                failed += 1
                bar.write(f"mra-run: {rec['image']}: {e}", file=sys.stderr)
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            f.flush()
    if not a.quiet:
        print(f"mra-run: {len(todo) - failed} answered, {len(images) - len(todo)} already in {a.out}, "
              f"{failed} failed", file=sys.stderr)
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
            pipe.encode_image(a.image)  # fail now, not at the first question
            chat.reset(a.image)
        if interactive:
            print(f"mra-chat: {a.bundle} ({pipe.vision.label}, {pipe.llm_artifact.file}). {CHAT_HELP}",
                  file=sys.stderr)
        while True:
            if interactive:
                sys.stdout.write("USER> ")
                sys.stdout.flush()
            line = sys.stdin.readline()
            if not line:
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
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, format="%(message)s")
    if not verbose:
        _quiet_onnxruntime()
    try:
        return body(argv)
    except MraError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `mra-run ... | head -1`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as e:  # one line for the user; -v shows the traceback
        if verbose:
            raise
        print(f"{prog}: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


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
