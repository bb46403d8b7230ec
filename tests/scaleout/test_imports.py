"""The base install stays free of Ray: only glimpse.scaleout imports it, and only when asked to."""

from __future__ import annotations

import subprocess
import sys


def test_glimpse_does_not_import_ray():
    code = (
        "import sys\n"
        "import glimpse, glimpse.server, glimpse.server.app, glimpse.agents, glimpse.cli, glimpse.scaleout.batch\n"
        "from glimpse.cli import build_parser\n"
        "build_parser().parse_args(['extract', 'a.pdf', '--schema', 's.json', '--ray'])\n"
        "print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"
