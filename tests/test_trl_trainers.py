"""cutce.trl inside TRL's real trainers (float32 CPU, tiny random models, offline).

Each of TRL's SFT, DPO (LoRA), GRPO, RLOO and KTO trainers runs a few steps without and with
cutce.trl.patch() from the same seed: the logged losses / rewards / metrics and the trained
parameters agree to float32 rounding, and the patched run computes its head with cutce only. On a
wider vocabulary, no (batch, seq, vocab) tensor exists anywhere in a patched training step, while
TRL's own CPU head shows one in the same run.
"""

from __future__ import annotations

import pytest

pytest.importorskip("trl")
pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
from trl_cases import HIDDEN, chunk_rows, trainer_runs  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

VOCAB_WIDE = 1000  # with 8-token chunks: N x V is far more "rows" of V than the V x D weight


def assert_no_logits(rows, positions):
    """TRL's CPU head scores every one of a batch's ``positions`` at once (so the detector sees an
    N x V tensor there); cutce's largest vocabulary-sized tensor is the V x D weight, its gradient
    or optimizer state."""
    assert rows["trl"] >= positions > HIDDEN, rows
    assert 0 < rows["cutce"] <= HIDDEN, rows


def test_sft_trainer_packed(monkeypatch):
    """Packing: padding-free rows with position_ids and flash-attention varlen kwargs."""
    logs, _, _ = trainer_runs(monkeypatch, "sft", "qwen2", steps=3, packing=True)
    assert {"loss", "entropy", "mean_token_accuracy"} <= logs[0].keys()


def test_sft_trainer(monkeypatch):
    logs, _, _ = trainer_runs(monkeypatch, "sft", "llama", loss_type="dft")
    assert logs[0]["loss"] > 0


def test_no_logits_sized_tensor_in_a_patched_sft_training_step(monkeypatch):
    """The whole training step (forward, backward, optimizer) of SFTTrainer after patch()."""
    chunk_rows(monkeypatch, 8, VOCAB_WIDE)
    logs, _, rows = trainer_runs(monkeypatch, "sft", "llama", vocab=VOCAB_WIDE, steps=1,
                                 per_device_train_batch_size=8)
    assert logs[0]["num_tokens"] >= 8 * 6  # 8 rows of >= 6 tokens: N x V >= 48 "rows" of V
    assert_no_logits(rows, 8 * 5)  # 8 texts of >= 5 words and EOS, less the last position


def test_dpo_trainer_lora(monkeypatch):
    """LoRA: the reference log-probs come from the same hooked model with the adapter disabled;
    use_weighting adds log_sum_sq_probs."""
    logs, _, _ = trainer_runs(monkeypatch, "dpo", "llama", use_weighting=True)
    assert {"rewards/chosen", "rewards/margins", "logps/chosen", "logits/chosen"} <= logs[-1].keys()
    assert logs[-1]["rewards/margins"] != 0.0


def test_grpo_trainer(monkeypatch):
    """Sampled completions, a reward, temperature in the head, a reference model (beta > 0)."""
    logs, _, _ = trainer_runs(monkeypatch, "grpo", "qwen2", beta=0.1, temperature=0.8)
    assert {"reward", "kl", "entropy"} <= logs[-1].keys() and logs[-1]["kl"] > 0


def test_rloo_trainer(monkeypatch):
    """RLOO: 4 sampled completions per prompt, leave-one-out baselines from the reward, the
    temperature in the policy's and the reference's heads (beta > 0), the entropy metric; its
    sampling runs the model's own forward, its training step has no N x V tensor."""
    chunk_rows(monkeypatch, 8, VOCAB_WIDE)
    logs, trainer, rows = trainer_runs(monkeypatch, "rloo", "qwen2", vocab=VOCAB_WIDE, beta=0.1,
                                       temperature=0.8, per_device_train_batch_size=8)
    assert type(trainer).__name__ == "RLOOTrainer" and trainer.ref_model is not None
    assert {"reward", "reward_std", "kl", "entropy"} <= logs[-1].keys()
    assert logs[-1]["kl"] > 0 and logs[-1]["reward_std"] > 0 and logs[-1]["entropy"] > 0
    # 8 rows, padded to the longest completion, of >= 3 prompt words, less the last position
    assert_no_logits(rows, 8 * (2 + int(logs[0]["completions/max_length"])))


def test_kto_trainer(monkeypatch):
    """KTO: unpaired desirable / undesirable completions, the policy's KL batch under no_grad,
    a reference model hooked without temperature, and the mean_logits the logits/* metrics read."""
    chunk_rows(monkeypatch, 8, VOCAB_WIDE)
    logs, trainer, rows = trainer_runs(monkeypatch, "kto", "llama", vocab=VOCAB_WIDE,
                                       per_device_train_batch_size=8)
    assert type(trainer).__name__ == "KTOTrainer" and trainer.ref_model is not None
    assert {"kl", "entropy", "logits/chosen", "logits/rejected", "rewards/chosen",
            "logps/rejected"} <= logs[-1].keys()
    assert_no_logits(rows, 8 * 5)  # 8 of >= 3 prompt words, 2 completion words and EOS, less one
