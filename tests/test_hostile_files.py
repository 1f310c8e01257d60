"""Hostile files where a spec is expected — binary data (a checkpoint passed by mistake), a FIFO, a device, a folder,
a file far too large, a spec that ``extends`` one of them — give one plain ``error:`` line from every command that
reads a spec: no traceback, no hang (a FIFO is never opened: opening one blocks until a writer appears)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from spvit_dsl.cli import main

COMMANDS = [
    ["compile", "{f}"],
    ["fmt", "{f}"],
    ["diff", "{f}", "{f}"],
    ["build", "{f}", "--out", "{tmp}/x.safetensors"],
    ["eval", "{f}"],
    ["export", "{f}", "--onnx", "{tmp}/x.onnx"],
    ["bench", "{f}"],
    ["search", "{f}", "--out", "{tmp}/run"],
]
WANT = {
    "binary": "not UTF-8 text",
    "folder": "a folder",
    "huge": "far too large",
    "device": "not a regular file",
}
EXIT = {"diff": 2}  # diff: 0 same, 1 different, 2 trouble (as diff(1)); every other command: 1


def _hostile(tmp: Path, kind: str) -> str:
    if kind == "binary":
        path = tmp / "search.ckpt.vit"
        path.write_bytes(b"\x80\xb0\x00\xffsafetensors" + bytes(range(256)) * 4)
    elif kind == "folder":
        path = tmp / "folder.vit"
        path.mkdir()
    elif kind == "huge":
        path = tmp / "huge.vit"
        with open(path, "wb") as fh:
            fh.truncate(64 * 2**20)  # sparse: no disk used
    else:
        return "/dev/zero"  # endless: reading it would never finish
    return str(path)


@pytest.mark.parametrize("kind", list(WANT))
@pytest.mark.parametrize("command", COMMANDS, ids=[c[0] for c in COMMANDS])
def test_every_command_refuses_a_hostile_spec_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str, command: list[str]
) -> None:
    if kind == "device" and not os.path.exists("/dev/zero"):
        pytest.skip("no /dev/zero on this platform")
    f = _hostile(tmp_path, kind)
    with pytest.raises(SystemExit) as info:
        main([a.format(f=f, tmp=tmp_path) for a in command])
    assert info.value.code == EXIT.get(command[0], 1)
    out = capsys.readouterr()
    lines = [line for line in (out.out + out.err).splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert WANT[kind] in lines[0]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs os.mkfifo (POSIX)")
def test_a_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "spec.vit"
    os.mkfifo(fifo)
    done = subprocess.run(
        [sys.executable, "-m", "spvit_dsl", "compile", str(fifo)],
        capture_output=True,
        text=True,
        timeout=300,  # a hang guard only: the refusal takes as long as importing the package
    )
    assert done.returncode == 1 and done.stderr.strip().endswith("not a regular file"), done.stderr
    assert "Traceback" not in done.stderr


def test_extends_of_a_binary_file_points_at_the_extends_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "base.vit").write_bytes(b"\xff\xfe\x00binary")
    spec = tmp_path / "child.vit"
    spec.write_text('extends "base.vit"\n')
    with pytest.raises(SystemExit) as info:
        main(["compile", str(spec)])
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert f"{spec}:1:1: error: cannot read 'base.vit': not UTF-8 text" in err
    assert "^" in err and "Traceback" not in err
