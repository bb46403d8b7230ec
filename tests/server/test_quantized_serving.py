"""The three serve commands of NVIDIA's launch post (BF16, FP8 with `--quantization modelopt`, NVFP4 with
`--quantization modelopt_fp4`), as the README shows them, run against tiny VL checkpoints written in each
published layout by `glimpse make-tiny --vl --quantization`: the real server starts, says in its log
which precision it loaded and how much memory the weights take, lists the model, and answers an image
question through the `openai` client."""

from __future__ import annotations

import base64
import io
import subprocess
import sys

import pytest
from openai import OpenAI
from PIL import Image

from tests.server.server_process import start_server

pytestmark = pytest.mark.slow

# (make-tiny --quantization, serve flags after the model, what the startup log says of the weights)
COMMANDS = {
    "bf16": (None, ["--trust-remote-code", "--dtype", "bfloat16", "--video-pruning-rate", "0"], "bfloat16 weights"),
    "fp8": ("fp8", ["--trust-remote-code", "--quantization", "modelopt", "--video-pruning-rate", "0"], "FP8 weights"),
    "nvfp4": (
        "nvfp4",
        ["--trust-remote-code", "--quantization", "modelopt_fp4", "--video-pruning-rate", "0"],
        "NVFP4 weights",
    ),
}


def _image_url() -> str:
    buf = io.BytesIO()
    Image.new("RGB", (300, 200), (200, 30, 30)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.mark.parametrize("precision", list(COMMANDS))
def test_launch_post_serve_commands(precision, tmp_path):
    quantization, flags, said = COMMANDS[precision]
    model = tmp_path / f"tiny-vl-{precision}"
    make = [sys.executable, "-m", "glimpse.cli", "make-tiny", str(model), "--vl"]
    if quantization:
        make += ["--quantization", quantization]
    subprocess.run(make, check=True, capture_output=True, timeout=300)
    server = start_server(str(model), *flags)
    try:
        client = OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)
        (card,) = client.models.list().data
        assert card.id == str(model)
        r = client.chat.completions.create(
            model=card.id,
            messages=[{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": _image_url()}},
                {"type": "text", "text": "What colour is this? /no_think"}]}],
            max_tokens=4, temperature=0,
        )  # fmt: skip
        assert r.choices[0].finish_reason in ("length", "stop")
        assert r.usage.prompt_tokens > 256  # the image's tokens are in the prompt
        loaded = [line for line in server.log().splitlines() if "loaded " in line and " on cpu" in line]
        assert loaded and said in loaded[0], server.log()[-2000:]
        assert "MiB" in loaded[0] or "GiB" in loaded[0]
    finally:
        server.stop()
        server.remove_log()
