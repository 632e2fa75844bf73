"""The update does not depend on how a mini-batch is cut into micro-batches (docs/method.md section 4,
"Group-exact"): one RL step of a tiny float64 model with LatentExploration (its log-mean-exp over whole groups
and a quantile bound), the gated KL, an entropy bonus and each policy loss gives the same weights whatever
``micro_batch_size`` is."""

from __future__ import annotations

import pytest
import torch
import transformers.models.qwen2.modeling_qwen2 as qwen2

from relax_pl.callbacks import KoopmanFit, LatentExploration
from relax_pl.cli import main
from relax_pl.models import load_causal_lm
from relax_pl.config import ObjectiveConfig, UpdateConfig
from relax_pl.losses import KLCov
from relax_pl.module import RLVRModule


@pytest.fixture
def float64_norms(monkeypatch):
    """HF's RMSNorm computes in float32 whatever the model's dtype, which would cap a float64 check at float32's
    precision (measured: 1.5e-8 relative between micro-batch sizes with no ReLaX term at all; 4e-16 with this)."""

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

    monkeypatch.setattr(qwen2.Qwen2RMSNorm, "forward", forward)


LOSSES = {  # recipe arguments of each policy loss
    "ppo": ["--model.objective.policy_loss=relax_pl.losses.PPOClip", "--model.objective.policy_loss.clip_high=0.28"],
    "clip_cov": [
        "--model.objective.policy_loss=relax_pl.losses.ClipCov", "--model.objective.policy_loss.clip_high=0.28",
        "--model.objective.policy_loss.ratio=0.05", "--model.objective.policy_loss.bounds=[0.0, 100.0]",
    ],
    "kl_cov": ["--model.objective.policy_loss=relax_pl.losses.KLCov", "--model.objective.policy_loss.ratio=0.05"],
    "gspo": ["--model.objective.policy_loss=relax_pl.losses.GSPO"],
    "cispo": ["--model.objective.policy_loss=relax_pl.losses.CISPO", "--model.objective.policy_loss.clip_high=0.01"],
    "dr_grpo": ["--model.objective.policy_loss=relax_pl.losses.DrGRPO"],
}


def one_step(folder, model, group: int, micro: int, policy_loss: str, spectrum: str):
    """Weights after one RL step (two PPO epochs over two prompts) and the step's logged metrics."""
    cli = main(
        [
            "--seed_everything=5", "--trainer.accelerator=cpu", "--trainer.max_steps=2", "--trainer.logger=false",
            "--trainer.enable_checkpointing=false", "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false", "--trainer.limit_val_batches=0",
            f"--trainer.default_root_dir={folder}", f"--model.pretrained={model}",
            "--model.setup=relax_pl.setups.SingleDevice", "--model.setup.dtype=float64",
            "--model.reward=probes.LengthParityReward",
            f"--model.sampling.num_responses={group}", "--model.sampling.max_new_tokens=14",
            *LOSSES[policy_loss], "--model.objective.entropy_coef=0.01",
            "--model.update.ppo_epochs=2", f"--model.update.micro_batch_size={micro}", "--model.update.grad_clip=1e9",
            # eps far above |g|: Adam's step is then lr * g / eps, so weights follow the gradients linearly
            "--model.optimizer.lr=1.0", "--model.optimizer.eps=1.0",
            "--data.train_source=builtin:arithmetic", "--data.task_options={digits: 1, operations: '+', num_samples: 8}",
            "--data.batch_size=2",
        ],
        run=False,
    )
    explore = LatentExploration(
        alpha=1.0, xi_mode="quantile", xi_quantile=0.5, kl_coef=0.5, gate_positive_only=False, n_min=5,
        spectrum=spectrum,
    )
    cli.trainer.callbacks.extend([KoopmanFit(m=4, steps=3, lr=1e-3), explore])
    cli.trainer.fit(cli.model, cli.datamodule)
    weights = {name: p.detach().clone() for name, p in cli.model.policy.named_parameters()}
    return weights, {k: float(v) for k, v in cli.trainer.callback_metrics.items()}


@pytest.mark.slow
@pytest.mark.parametrize(
    "group, spectrum, policy_loss",
    [
        *((group, spectrum, policy_loss) for policy_loss in ("ppo", "clip_cov", "kl_cov")
          for group, spectrum in ((5, "sv_compat"), (8, "eig"))),
        (5, "sv_compat", "gspo"),  # seq-mean-token-mean: the mini-batch's response count is the normaliser
        (5, "sv_compat", "cispo"),
        (5, "sv_compat", "dr_grpo"),  # seq-mean-token-sum-norm: responses and the token budget are the normaliser
    ],
    ids=lambda value: {5: "group5", 8: "group8"}.get(value, str(value)),
)
def test_update_does_not_depend_on_micro_batch_size(tmp_path, tiny_model, float64_norms, group, spectrum, policy_loss):
    start = {name: p.double() for name, p in load_causal_lm(str(tiny_model), dtype="float64").named_parameters()}
    runs = {micro: one_step(tmp_path / str(micro), tiny_model, group, micro, policy_loss, spectrum) for micro in (1, 2, group, 2 * group)}
    reference, metrics = runs[2 * group]  # the whole mini-batch in one micro-batch: every group whole
    # the step trained, and every term took part
    moved = torch.cat([(reference[k] - start[k]).flatten() for k in start])
    assert moved.norm() > 1e-3, "the weights did not move"
    assert abs(metrics["relax/xp_loss"]) > 0 and metrics["relax/gated_kl_loss"] > 0
    assert 0 < metrics["relax/gated_frac"] < 1 and metrics["relax/grad_share"] > 0
    if policy_loss in ("clip_cov", "kl_cov"):
        assert metrics["actor/cov_selected_frac"] > 0
    for micro, (weights, _) in runs.items():
        change = torch.cat([(weights[k] - start[k]).flatten() for k in start])
        assert torch.isfinite(change).all()
        relative = float((change - moved).norm() / moved.norm())
        assert relative < 1e-9, f"micro_batch_size={micro}: the update differs by {relative:.3g} (relative)"


def test_kl_cov_in_a_single_pass_is_refused_before_loading(tmp_path, tiny_model, monkeypatch):
    import relax_pl.setups

    monkeypatch.setattr(relax_pl.setups, "load_causal_lm", lambda *a, **k: pytest.fail("model loaded"))
    args = [
        "fit", "--trainer.accelerator=cpu", "--trainer.max_steps=1", "--trainer.logger=false",
        f"--trainer.default_root_dir={tmp_path}", f"--model.pretrained={tiny_model}",
        "--model.objective.policy_loss=relax_pl.losses.KLCov", "--data.train_source=builtin:arithmetic",
        "--data.batch_size=2",
    ]
    with pytest.raises(ValueError, match="ppo_epochs >= 2.*mini_batch_size"):
        main(args)
    two_passes = RLVRModule(objective=ObjectiveConfig(policy_loss=KLCov()), update=UpdateConfig(ppo_epochs=2))
    two_passes.check_update_plan(prompts_per_step=2)  # accepted
    two_mini_batches = RLVRModule(objective=ObjectiveConfig(policy_loss=KLCov()), update=UpdateConfig(mini_batch_size=8))
    two_mini_batches.check_update_plan(prompts_per_step=2)  # 16 responses, 2 optimiser steps: accepted
    with pytest.raises(ValueError, match="mini_batch_size=6 is not a multiple of model.sampling.num_responses=8"):
        main([*args, "--model.objective.policy_loss=relax_pl.losses.PPOClip", "--model.update.mini_batch_size=6"])
