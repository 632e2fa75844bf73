"""relax_pl against Hugging Face TRL's GRPOTrainer at equal settings, one optimiser step of each in turn.

    python benchmarks/vs_trl.py              # SmolLM2-135M-Instruct, recipes/quickstart.yaml (~8 min, 2 cores)
    python benchmarks/vs_trl.py --fast       # a tiny random Qwen2 instead (seconds; checks the harness)
    python benchmarks/vs_trl.py --steps 6 --threads 2 --no-relax-row

TRL comes from the ``bench`` extra (``pip install -e ".[bench]"``). Both sides are built from one recipe
(``--config``, default the quickstart): the same model, loaded by ``relax_pl.models.load_causal_lm`` in each
process; the same prompts in the same order (shuffling off on both sides, so step k trains on the same k-th
batch of prompts); the same reward (``model.reward`` through the same time-bounded scorer); the same completions
per step, completion length and sampling parameters (TRL gets a complete generation config, so the checkpoint's
own generation defaults apply to neither); the same optimiser (AdamW, lr, betas, eps, weight decay, constant
rate), gradient clip, micro-batch (TRL: ``per_device_train_batch_size`` x ``gradient_accumulation_steps``), clip
range, loss normalisation (TRL ``loss_type="dapo"`` is relax_pl's ``token-mean``), KL weight, dtype, gradient
checkpointing and thread count.

Each framework runs in its own process, so the peak resident memory is its own; the peak is reset when its first
step starts (``/proc/self/clear_refs``), so it measures training, not model loading (the same loader on both
sides). The parent releases one optimiser step at a time, rotating the order every step (relax_pl, TRL, ReLaX;
then TRL, ReLaX, relax_pl; ...), so every framework sees the same machine load; the others wait, idle, and none
exits before all are done. A step's time runs from its start to the next step's start (everything each framework
does per step, logging included).
The first step (allocator warm-up, the reward worker's start, the ReLaX dictionary fit) is shown apart; the
medians are over the other steps.
"""

from __future__ import annotations

import argparse
import importlib
import multiprocessing as mp
import re
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml

from relax_pl.cli import main

RELAX_CALLBACKS = ("KoopmanFit", "LatentExploration")
FRAMEWORKS = {"relax_pl": "relax_pl", "trl": "TRL", "relax_pl+relax": "relax_pl + ReLaX callbacks"}


def peak_rss_gb() -> float:
    """The process's peak resident set size since the last :func:`reset_peak_rss` (Linux ``VmHWM``)."""
    status = Path("/proc/self/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) / 2**20


def reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")


class Gate:
    """Holds a worker at the start of every optimiser step until the parent releases it, and reports the
    finished step's numbers when the next one starts (or training ends)."""

    def __init__(self, conn) -> None:
        self.conn = conn
        self.started: float | None = None
        self.record: dict[str, float] = {}

    def step_begins(self) -> None:
        if self.started is None:
            reset_peak_rss()
            self.conn.send("ready")
        else:
            self.report()
        self.conn.recv()
        self.record = {}
        self.started = time.perf_counter()

    def training_ends(self) -> None:
        self.report()
        self.conn.recv()  # exit only once every framework is done: a process tearing down would slow another's step
        self.conn.close()

    def report(self) -> None:
        self.record["step_s"] = time.perf_counter() - self.started
        self.record["peak_rss_gb"] = peak_rss_gb()
        self.conn.send(self.record)


# ------------------------------------------------------------------------------------------------- relax_pl
class LightningGate(L.Callback):
    def __init__(self, gate: Gate) -> None:
        self.gate = gate

    def on_train_batch_start(self, *args: Any) -> None:
        self.gate.step_begins()

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        m = {k: float(v) for k, v in trainer.callback_metrics.items()}
        self.gate.record.update(
            gen_s=m["timing_s/gen"],
            gen_tokens=m["perf/gen_tokens_per_s"] * m["timing_s/gen"],
            update_s=m["timing_s/update"],
            reward=m["critic/score/mean"],
        )

    def on_train_end(self, *args: Any) -> None:
        self.gate.training_ends()


def run_relax(conn, cli_args: list[str], threads: int) -> None:
    torch.set_num_threads(threads)
    gate = Gate(conn)
    cli = main(cli_args, run=False)
    cli.trainer.callbacks.append(LightningGate(gate))
    cli.trainer.fit(cli.model, cli.datamodule)


# ------------------------------------------------------------------------------------------------- TRL
def run_trl(conn, cli_args: list[str], threads: int) -> None:
    """TRL's GRPOTrainer with every setting taken from the same parsed recipe as the relax_pl side."""
    from datasets import Dataset
    from transformers import PrinterCallback, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from relax_pl.losses import PPOClip
    from relax_pl.models import load_causal_lm, load_tokenizer
    from relax_pl.rewards import BoundedScorer, reward_fields
    from relax_pl.rollout import stop_token_ids

    torch.set_num_threads(threads)
    gate = Gate(conn)
    cli = main(cli_args, run=False)  # builds nothing heavy: the relax_pl model loads lazily, and never here
    module, data, trainer_config = cli.model, cli.datamodule, cli.config["trainer"]
    sampling, objective, update, optim = module.sampling, module.objective, module.update, module.optimizer_config
    setup = module.model_setup
    clip = objective.policy_loss
    if update.ppo_epochs != 1 or update.mini_batch_size is not None or type(clip) is not PPOClip:
        raise ValueError("the TRL side mirrors one PPO-clip update per step only (ppo_epochs 1, no mini_batch_size)")
    if objective.aggregation != "token-mean" or objective.entropy_coef:
        raise ValueError("the TRL side mirrors loss_agg token-mean (TRL 'dapo') without an entropy bonus only")

    model = load_causal_lm(module.pretrained, dtype=setup.dtype, trust_remote_code=module.trust_remote_code)
    tokenizer = load_tokenizer(
        module.pretrained, trust_remote_code=module.trust_remote_code, chat_template=module.chat_template
    )
    model.generation_config.eos_token_id = stop_token_ids(model, tokenizer)  # the stop tokens relax_pl uses

    steps = trainer_config["max_steps"]
    data.setup("fit")
    samples = [reward_fields(data.train_data[i]) for i in range(steps * data.batch_size)]
    dataset = Dataset.from_list([{"prompt": s["messages"], "index": i} for i, s in enumerate(samples)])
    scorer = BoundedScorer(module.reward)

    def reward(prompts, completions, index, **_):
        scored = scorer([c[-1]["content"] for c in completions], [samples[i] for i in index])
        rewards = scored.components["overall"]
        gate.record["reward"] = sum(rewards) / len(rewards)
        return rewards

    reward.__name__ = type(module.reward).__name__

    class TimedGRPOTrainer(GRPOTrainer):
        def _generate(self, prompts):
            start = time.perf_counter()
            out = super()._generate(prompts)
            gate.record.update(gen_s=time.perf_counter() - start, gen_tokens=sum(len(ids) for ids in out[1]))
            return out

        def _generate_and_score_completions(self, inputs):
            out = super()._generate_and_score_completions(inputs)
            self.update_started = time.perf_counter()
            return out

    class TrainerGate(TrainerCallback):
        def on_step_begin(self, *args, **kwargs):
            gate.step_begins()

        def on_step_end(self, *args, **kwargs):
            gate.record["update_s"] = time.perf_counter() - trainer.update_started

        def on_train_end(self, *args, **kwargs):
            gate.training_ends()

    rollout_size = data.batch_size * sampling.num_responses
    if rollout_size % update.micro_batch_size:
        raise ValueError(f"{rollout_size} responses a step do not fill micro-batches of {update.micro_batch_size}")
    with tempfile.TemporaryDirectory() as out:
        config = GRPOConfig(
            output_dir=out,
            use_cpu=trainer_config["accelerator"] == "cpu",
            bf16=setup.dtype == "bfloat16",
            fp16=False,
            gradient_checkpointing=setup.gradient_checkpointing,
            seed=cli.config["seed_everything"],
            max_steps=steps,
            per_device_train_batch_size=update.micro_batch_size,
            gradient_accumulation_steps=rollout_size // update.micro_batch_size,
            num_generations=sampling.num_responses,
            max_completion_length=sampling.max_new_tokens,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k,
            repetition_penalty=1.0,
            learning_rate=optim.lr,
            adam_beta1=optim.betas[0],
            adam_beta2=optim.betas[1],
            adam_epsilon=optim.eps,
            weight_decay=optim.weight_decay,
            lr_scheduler_type="constant",
            max_grad_norm=update.grad_clip,
            beta=objective.kl_coef,
            epsilon=clip.clip_low,
            epsilon_high=clip.clip_high,
            loss_type="dapo",
            scale_rewards="group" if objective.advantages_scaled else "none",
            shuffle_dataset=False,
            logging_steps=1,
            report_to="none",
            save_strategy="no",
            disable_tqdm=True,
        )
        trainer = TimedGRPOTrainer(
            model=model, reward_funcs=reward, args=config, train_dataset=dataset, processing_class=tokenizer
        )
        trainer.remove_callback(PrinterCallback)
        trainer.add_callback(TrainerGate())
        trainer.train()
    scorer.close()


WORKERS = {"relax_pl": run_relax, "trl": run_trl, "relax_pl+relax": run_relax}


# ------------------------------------------------------------------------------------------------- parent
@dataclass
class Worker:
    name: str
    process: mp.Process
    conn: Any
    steps: list[dict[str, float]]


def relax_callbacks(recipe: str) -> list[dict]:
    """The ReLaX callbacks (KoopmanFit, LatentExploration) of ``recipe``, with its settings."""
    callbacks = yaml.safe_load(Path(recipe).read_text())["trainer"]["callbacks"]
    chosen = [c for c in callbacks if c["class_path"].rsplit(".", 1)[-1] in RELAX_CALLBACKS]
    if len(chosen) != len(RELAX_CALLBACKS):
        raise ValueError(f"{recipe} does not configure all of {RELAX_CALLBACKS}")
    return chosen


def relax_callbacks_missing() -> str | None:
    """Why the ReLaX row cannot run, or None."""
    try:
        package = importlib.import_module("relax_pl.callbacks")
    except ImportError as error:
        return f"relax_pl.callbacks does not import ({error})"
    missing = [name for name in RELAX_CALLBACKS if not hasattr(package, name)]
    return f"relax_pl.callbacks has no {', '.join(missing)}" if missing else None


def recipe_args(config: str, pretrained: str | None, steps: int, out: str, callbacks: list[dict]) -> list[str]:
    args = [
        "--config", config,
        f"--trainer.max_steps={steps}",
        "--trainer.logger=false",
        "--trainer.enable_checkpointing=false",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--trainer.limit_val_batches=0",
        f"--trainer.default_root_dir={out}",
        f"--trainer.callbacks={yaml.safe_dump(callbacks, default_flow_style=True).strip()}",
        "--data.shuffle=false",  # TRL is told shuffle_dataset=False: step k trains on the same prompts on both sides
    ]
    return args + ([f"--model.pretrained={pretrained}"] if pretrained else [])


def settings(cli_args: list[str], threads: int, steps: int) -> tuple[list[str], int]:
    """The configuration's description, and the responses per step."""
    cli = main(cli_args, run=False)
    m, d = cli.model, cli.datamodule
    s, o, u, opt = m.sampling, m.objective, m.update, m.optimizer_config
    lines = [
        f"model {m.pretrained}; {m.model_setup.dtype}; gradient checkpointing {m.model_setup.gradient_checkpointing}; "
        f"{threads} threads; {steps} optimiser steps each (first shown apart)",
        f"{d.batch_size} prompts x {s.num_responses} completions per step, at most {s.max_new_tokens} new tokens, "
        f"temperature {s.temperature}, top_p {s.top_p}, top_k {s.top_k}",
        f"AdamW lr {opt.lr} betas {tuple(opt.betas)}, grad clip {u.grad_clip}, micro-batch {u.micro_batch_size}, "
        f"clip ({o.policy_loss.clip_low}, {o.policy_loss.clip_high}), KL weight {o.kl_coef}, loss {o.aggregation} "
        "(TRL 'dapo'), "
        f"reward {type(m.reward).__name__}",
    ]
    return lines, d.batch_size * s.num_responses


def start(name: str, cli_args: list[str], threads: int) -> Worker:
    parent_conn, child_conn = mp.Pipe()
    process = mp.Process(target=WORKERS[name], args=(child_conn, cli_args, threads), name=name)
    process.start()
    child_conn.close()
    return Worker(name, process, parent_conn, [])


def receive(worker: Worker) -> Any:
    try:
        return worker.conn.recv()
    except EOFError:
        worker.process.join()
        raise RuntimeError(f"the {worker.name} worker exited (code {worker.process.exitcode}); see its output above")


def alternate(workers: list[Worker], steps: int) -> None:
    for worker in workers:
        if receive(worker) != "ready":
            raise RuntimeError(f"the {worker.name} worker did not start its first step")
    for step in range(steps):
        shift = step % len(workers)
        for worker in workers[shift:] + workers[:shift]:
            worker.conn.send("go")
            worker.steps.append(receive(worker))
            r = worker.steps[-1]
            print(f"step {step + 1} {worker.name}: {r['step_s']:.1f} s (generation {r['gen_s']:.1f} s, "
                  f"update {r['update_s']:.1f} s)", flush=True)
    for worker in workers:
        worker.conn.send("exit")
    for worker in workers:
        worker.process.join()


def summary(steps: list[dict[str, float]]) -> dict[str, float]:
    rest = steps[1:] or steps
    med = lambda key: statistics.median(s[key] for s in rest)  # noqa: E731
    return {
        "first_s": steps[0]["step_s"],
        "step_s": med("step_s"),
        "gen_tok_s": statistics.median(s["gen_tokens"] / s["gen_s"] for s in rest),
        "update_s": med("update_s"),
        "peak_rss_gb": max(s["peak_rss_gb"] for s in steps),
        "length": statistics.mean(s["gen_tokens"] for s in steps),
        "reward": statistics.mean(s["reward"] for s in steps),
    }


def table(
    results: dict[str, dict[str, float]],
    responses: int,
    names: dict[str, str] = FRAMEWORKS,
    ratio: tuple[str, str] = ("relax_pl", "trl"),
    first_column: str = "framework",
) -> str:
    """The markdown table of ``summary`` rows, named by ``names``, with a row of ``ratio[0] / ratio[1]``."""
    columns = [
        ("median step (s)", "step_s", "{:.3g}"),
        ("first step (s)", "first_s", "{:.3g}"),
        ("gen tokens/s", "gen_tok_s", "{:.0f}"),
        ("update (s)", "update_s", "{:.3g}"),
        ("peak RSS (GB)", "peak_rss_gb", "{:.2f}"),
        ("mean length", "length", "{:.1f}"),
        ("mean reward", "reward", "{:.3f}"),
    ]
    header = f"| {first_column} | " + " | ".join(c[0] for c in columns) + " |"
    lines = [header, "|" + "---|" * (len(columns) + 1)]
    for name, r in results.items():
        r = dict(r, length=r["length"] / responses)
        lines.append(f"| {names[name]} | " + " | ".join(fmt.format(r[key]) for _, key, fmt in columns) + " |")
    top, bottom = ratio
    if top in results and bottom in results:
        a, b = results[top], results[bottom]
        ratios = [f"{a[key] / b[key]:.2f}x" if key not in ("length", "reward") else "" for _, key, _ in columns]
        lines.append(f"| {names[top]} / {names[bottom]} | " + " | ".join(ratios) + " |")
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="recipes/quickstart.yaml", help="the recipe both sides are built from")
    parser.add_argument("--relax-config", default="recipes/quickstart_relax.yaml",
                        help="where the ReLaX row's KoopmanFit and LatentExploration settings come from")
    parser.add_argument("--steps", type=int, default=4, help="optimiser steps per framework (the first is shown apart)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--fast", action="store_true", help="a tiny random Qwen2 instead of the recipe's model")
    parser.add_argument("--no-relax-row", action="store_true", help="skip the row with the ReLaX callbacks")
    return parser.parse_args()


def run(args: argparse.Namespace) -> None:
    try:
        import trl
    except ImportError:
        raise SystemExit('TRL is not installed; install the bench extra: pip install -e ".[bench]"') from None
    if args.steps < 2:
        raise SystemExit("--steps must be >= 2: the first step is shown apart from the medians")
    with tempfile.TemporaryDirectory() as tmp:
        pretrained = None
        if args.fast:
            from relax_pl.testing import save_tiny_model

            pretrained = str(save_tiny_model(Path(tmp) / "tiny"))
        names = ["relax_pl", "trl"]
        why_not = "skipped (--no-relax-row)" if args.no_relax_row else relax_callbacks_missing()
        if why_not is None:
            names.append("relax_pl+relax")
        cli_args = {
            name: recipe_args(
                args.config, pretrained, args.steps, str(Path(tmp) / name),
                relax_callbacks(args.relax_config) if name == "relax_pl+relax" else [],
            )
            for name in names
        }
        description, responses = settings(cli_args["relax_pl"], args.threads, args.steps)
        workers = [start(name, cli_args[name], args.threads) for name in names]
        try:
            alternate(workers, args.steps)
        finally:
            for worker in workers:
                if worker.process.is_alive():
                    worker.process.kill()
        results = {w.name: summary(w.steps) for w in workers}
    print(f"\nrelax_pl vs TRL {trl.__version__} ({args.config}{', --fast' if args.fast else ''})")
    print("\n".join(description))
    if why_not is not None:
        print(f"ReLaX row: {why_not}")
    print()
    print(table(results, responses))


if __name__ == "__main__":
    mp.set_start_method("spawn")
    run(parse_args())
