"""KARD's reranker on real local Ray Train (DDP, gloo, 2 workers) with a tiny random BERT (+ LoRA, dropout on):
checkpoints every N steps, a run stopped part way and rerun resumes from its checkpoint step (not step 0) and
ends where an uninterrupted run ends (same loss curve, same weights); a rerun of a finished run trains nothing.
"""
from __future__ import annotations

import contextlib
import json
import math
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def encoder(tmp_path_factory) -> Path:
    from transformers import AutoTokenizer, BertConfig, BertModel

    from kale_ray.methods.kard.reranker import resolve_encoder

    folder = tmp_path_factory.mktemp("enc")
    tok = AutoTokenizer.from_pretrained(resolve_encoder("builtin:minilm"))
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64)).save_pretrained(folder, safe_serialization=True)  # dropout 0.1
    tok.save_pretrained(folder)
    return folder


def _rows_file(folder: Path, n: int = 12) -> Path:
    words = ["alga", "fungus", "virus", "plant", "cell", "gene"]
    rows = []
    for i in range(n):
        w = words[i % len(words)]
        passages = [f"{w} is a kind of {words[(i + j) % len(words)]}" for j in range(3 + i % 2)]
        rows.append({"id": f"q{i}", "query": f"what is {w}?", "passages": json.dumps(passages),
                     "targets": json.dumps([float((i + j) % 3) for j in range(len(passages))])})
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _cfg(encoder: Path, *overrides: str):
    from kale_ray.config import load_config
    from kale_ray.methods.kard.config import RerankerConfig

    return load_config(RerankerConfig, None, [
        f"model={encoder}", "num_layers=1", "dim=8", "lora.r=4", "lora.alpha=8", "num_workers=2", "batch_size=2",
        "max_query_len=16", "max_passage_len=16", "lr=0.01", *overrides])


def _weights(out: Path, step: int) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    from kale_ray.methods.kard.rerank_train import TRAINABLE_FILE

    return load_file(str(out / "ray" / "reranker" / f"checkpoint_step{step:06d}" / TRAINABLE_FILE))


def _curve(summary_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (summary_dir / "history.jsonl").read_text().splitlines() if x]


def test_reranker_checkpoints_and_a_stopped_run_resumes_like_an_uninterrupted_one(ray_local, encoder, tmp_path):
    from kale_ray.methods.kard.rerank_train import train_reranker

    rows = _rows_file(tmp_path / "rows")  # 12 questions: 6 per worker, 3 steps per epoch

    whole = tmp_path / "whole"
    ref = train_reranker(_cfg(encoder, "max_steps=5", "checkpoint_every=2", "keep_checkpoints=5"), rows, whole)
    assert ref["steps"] == 5 and [a["start_step"] for a in ref["attempts"]] == [0]
    ckpts = sorted(p.name for p in (whole / "ray" / "reranker").glob("checkpoint_step*"))
    assert ckpts == ["checkpoint_step000002", "checkpoint_step000004", "checkpoint_step000005"]
    files = {p.name for p in (whole / "ray" / "reranker" / "checkpoint_step000002").iterdir()}
    assert {"state.json", "trainable.safetensors", "optimizer.pt", "rng_rank0.pt", "rng_rank1.pt"} <= files
    ref_curve = _curve(whole)
    assert [h["step"] for h in ref_curve] == [1, 2, 3, 4, 5] and [h["epoch"] for h in ref_curve] == [0, 0, 0, 1, 1]
    assert all(math.isfinite(h["loss"]) and h["loss"] >= 0 for h in ref_curve)
    assert all(h["questions"] == 4 for h in ref_curve)  # the step's questions over both workers
    assert (whole / "model" / "proj.safetensors").exists()

    # stopped part way (mid-epoch, after step 2), then the same out folder rerun for 5 steps
    part = tmp_path / "part"
    first = train_reranker(_cfg(encoder, "max_steps=2", "checkpoint_every=2", "keep_checkpoints=5"), rows, part)
    assert first["steps"] == 2
    first_curve = _curve(part)
    second = train_reranker(_cfg(encoder, "max_steps=5", "checkpoint_every=2", "keep_checkpoints=5"), rows, part)
    assert [a["start_step"] for a in second["attempts"]] == [0, 2]  # resumed from the checkpoint, not step 0
    assert second["steps"] == 5
    curve = _curve(part)
    assert [h["step"] for h in curve] == [1, 2, 3, 4, 5]
    assert curve[:2] == first_curve  # the curve up to the checkpoint is carried over, not recomputed
    # the resumed run trains the same rows from the same weights, optimizer and RNG: the same path
    for got, want in zip(curve, ref_curve):
        assert (got["step"], got["epoch"]) == (want["step"], want["epoch"])
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5, abs=1e-7), (got, want)
    w_ref, w_part = _weights(whole, 5), _weights(part, 5)
    assert set(w_ref) == set(w_part)
    for name in w_ref:
        torch.testing.assert_close(w_part[name], w_ref[name], rtol=1e-5, atol=1e-6)
    assert not torch.equal(_weights(part, 2)[next(iter(w_ref))], w_ref[next(iter(w_ref))])  # it did train on

    # a rerun of the finished run: restored at step 5, nothing trained (no new checkpoint, no new attempt
    # recorded), the same curve and the model written again
    (part / "model" / "reranker.json").unlink()
    third = train_reranker(_cfg(encoder, "max_steps=5", "checkpoint_every=2", "keep_checkpoints=5"), rows, part)
    assert [a["start_step"] for a in third["attempts"]] == [0, 2] and third["steps"] == 5
    assert _curve(part) == curve and (part / "model" / "reranker.json").exists()


class Killer(threading.Thread):
    """SIGKILLs the first of this test's processes whose command line contains ``title`` once ``ready()``."""

    def __init__(self, title: str, ready, timeout: float = 600):
        super().__init__(daemon=True)
        self.title, self.ready, self.timeout = title, ready, timeout
        self.killed: list[int] = []
        self.stop = threading.Event()

    def run(self):
        import psutil

        deadline = time.time() + self.timeout
        while not self.stop.is_set() and time.time() < deadline:
            if self.ready():
                for p in psutil.Process().children(recursive=True):
                    with contextlib.suppress(psutil.Error):
                        if self.title in " ".join(p.cmdline()):
                            p.send_signal(signal.SIGKILL)
                            self.killed.append(p.pid)
                            return
            time.sleep(0.05)


def test_reranker_worker_killed_restores_from_the_last_checkpoint(ray_local, encoder, tmp_path):
    """A training worker SIGKILLed once checkpoint 2 is registered: Ray Train restarts the group
    (max_failures=1) from the latest registered checkpoint; every step once in the curve, and steps
    trained before the kill and again after the restore have the same loss (the resume is exact)."""
    from kale_ray.methods.kard.rerank_train import train_reranker

    rows = _rows_file(tmp_path / "rows")
    out, steps = tmp_path / "kill", 16
    run_dir = out / "ray" / "reranker"
    on_disk: dict[int, dict] = {}
    registered: list[int] = []

    def ready() -> bool:
        with contextlib.suppress(OSError, ValueError, TypeError, AttributeError, KeyError):
            snap = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
            latest = int(snap["latest_checkpoint_result"]["checkpoint_dir_name"].removeprefix("checkpoint_step"))
            if latest >= 2:
                for d in run_dir.glob("checkpoint_step*"):
                    with contextlib.suppress(OSError, ValueError):
                        on_disk[int(d.name.removeprefix("checkpoint_step"))] = json.loads((d / "state.json").read_text())
                registered.append(latest)
                return True
        return False

    killer = Killer("RayTrainWorker", ready)
    killer.start()
    summary = train_reranker(_cfg(encoder, f"max_steps={steps}", "checkpoint_every=1", "keep_checkpoints=20",
                                  "max_failures=1"), rows, out)
    killer.stop.set()
    assert killer.killed, "no training worker was killed"
    curve = _curve(out)
    assert [h["step"] for h in curve] == list(range(1, steps + 1))  # none missing, none repeated
    attempts = summary["attempts"]
    assert len(attempts) == 2 and attempts[0]["start_step"] == 0
    restored = attempts[1]["start_step"]
    assert registered[0] <= restored < steps and restored in on_disk, (restored, registered, sorted(on_disk))
    assert restored > 0  # from the checkpoint, not from step 0
    assert curve[:restored] == on_disk[restored]["history"]
    redone = {h["step"]: h for st in on_disk.values() for h in st["history"] if h["step"] > restored}
    for st, h in redone.items():
        assert curve[st - 1]["loss"] == pytest.approx(h["loss"], rel=1e-5, abs=1e-7), st
    assert all(math.isfinite(h["loss"]) for h in curve) and (out / "model" / "proj.safetensors").exists()
    print(f"killed pid {killer.killed[0]} with checkpoint {registered[0]} registered; restored at step {restored}; "
          f"{len(redone)} steps trained again with the same loss")
