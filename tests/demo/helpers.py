"""What the demo suite's tests share: one question about one image through the OpenAI-compatible API."""

from __future__ import annotations

import base64

from services.demo import DEMO_MODEL_NAME


def ask(client, png: bytes, question: str, *, with_usage: bool = False):
    """One question about one PNG through the OpenAI-compatible API (greedy): the answer text."""
    uri = "data:image/png;base64," + base64.b64encode(png).decode()
    reply = client.chat.completions.create(
        model=DEMO_MODEL_NAME,
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": uri}},
                    {"type": "text", "text": question},
                ],
            }
        ],
        max_tokens=6,
        temperature=0,
    )
    answer = reply.choices[0].message.content.strip()
    return (answer, reply.usage) if with_usage else answer
