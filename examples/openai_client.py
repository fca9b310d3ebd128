"""An app calling mra-serve with the official `openai` client: a question about a photo, the
answer streamed, then the same photo asked for a JSON answer that follows a schema.

    mra-serve --bundle demo/bundle --api-key secret &          # in another terminal
    python examples/openai_client.py --image photo.jpg --api-key secret
"""

from __future__ import annotations

import argparse
import base64
import json
import mimetypes
import sys
from pathlib import Path

from openai import OpenAI

# What a robot wants to parse: a yes/no and a count, nothing else.
SCHEMA = {
    "type": "object",
    "properties": {"person": {"type": "boolean"}, "count": {"type": "integer", "minimum": 0, "maximum": 99}},
    "required": ["person", "count"],
    "additionalProperties": False,
}


def data_url(path: Path) -> str:
    """The image inline, as OpenAI's image_url parts carry it."""
    mime = mimetypes.guess_type(path.name)[0] or "image/png"
    return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode()


def main() -> int:
    p = argparse.ArgumentParser(description="Ask mra-serve about an image with the openai client.")
    p.add_argument("--image", type=Path, required=True, help="a photo (PNG, JPEG, ...)")
    p.add_argument("--prompt", default="What is in this picture?")
    p.add_argument("--base-url", default="http://127.0.0.1:8080/v1", help="mra-serve's /v1 URL")
    p.add_argument("--api-key", default="none", help="the key mra-serve was started with (--api-key)")
    p.add_argument("--max-tokens", type=int, default=128)
    a = p.parse_args()

    client = OpenAI(base_url=a.base_url, api_key=a.api_key, max_retries=0)
    model = client.models.list().data[0].id
    user = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(a.image)}},
                                        {"type": "text", "text": a.prompt}]}

    stream = client.chat.completions.create(model=model, messages=[user], max_tokens=a.max_tokens, temperature=0,
                                            stream=True)
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            print(chunk.choices[0].delta.content, end="", flush=True)
    print()

    question = {**user, "content": [user["content"][0], {"type": "text", "text": "Is there a person? How many?"}]}
    r = client.chat.completions.create(
        model=model, messages=[question], max_tokens=a.max_tokens, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "people", "schema": SCHEMA}})
    answer = json.loads(r.choices[0].message.content)  # the grammar makes it parse
    print(json.dumps(answer))
    print(f"usage: {r.usage.prompt_tokens} prompt tokens (image rows included), "
          f"{r.usage.completion_tokens} completion tokens", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
