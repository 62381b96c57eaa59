"""Train MKL-VisITA with accelerate.

    python -m training.train --config training/configs/shapes.yaml [key=value ...] [--resume latest|PATH]
        [--push-to-hub REPO]
    accelerate launch -m training.train --config training/configs/flickr30k.yaml   # DDP / bf16 on GPUs
    accelerate launch --num_processes 2 --cpu -m training.train --config ...        # two CPU processes (gloo)
    torchrun --nproc_per_node 2 -m training.train --config ...                      # the same, without accelerate

Layout of ``output_dir``::

    config.yaml, config.json     the resolved run config
    losses.jsonl                 one line per optimizer step: step, loss, each loss term, lr (main process)
    logs/                        tensorboard
    checkpoints/step_0000500/    accelerator.save_state + trainer_state.json + COMPLETE
    release/                     save_pretrained weights + tokenizer + README.md (card) + metrics.json
    metrics.json                 every evaluation, by step

Decisions:

- **Global batch.** ``batch_size`` is per process: with N processes (``accelerate launch --num_processes N``) a
  micro-batch is ``N x batch_size`` captions, process k taking the k-th ``batch_size`` slice of the sampler's order,
  and a step is ``grad_accum_steps`` of them. A run with N processes and ``batch_size=B`` sees the same captions per
  step as one process with ``batch_size=N*B``. The contrastive loss (ITC) is computed over the global batch, with the
  global positives mask (:mod:`training.distributed`); ITM hard negatives are sampled within each process's
  sub-batch and the other loss terms are per-process means that DDP averages. Logged losses are the mean over
  micro-batches and processes; only the main process writes the config, ``losses.jsonl``, tensorboard logs,
  evaluations, checkpoints' trainer state and the release (``save_state`` writes each process's RNG state).
- **Random streams.** The model is initialised from ``seed`` on every process (DDP also broadcasts it); with N > 1
  each process then reseeds with ``seed + process index``, so dropout and sampled negatives differ between
  sub-batches as they do between rows of one batch. One process keeps the single stream of ``seed``.
- **Mixed precision** (``mixed_precision: bf16 | fp16``) is accelerate's autocast where the device has it; bf16 on a
  GPU without bf16 support, and either on a machine with no GPU, falls back to fp32 with a message on stderr
  (:func:`resolve_mixed_precision`), rather than failing (fp16 needs a GPU) or crawling through CPU autocast.
- **Steps** are optimizer steps. An epoch is ``steps_per_epoch * grad_accum_steps`` full micro-batches per
  process; the tail of a shuffled epoch that does not fill a whole step is dropped, so every step sees the same
  number of captions and epochs end on a step boundary.
- **Data order** is a function of ``(seed, epoch)`` only (:class:`EpochSampler`), and the DataLoader draws its
  worker seeds from its own generator, never the global RNG, so ``--resume`` replays the exact batches: it skips
  the first ``(step % steps_per_epoch) * grad_accum_steps`` micro-batches of the epoch by offsetting the sampler
  (no images are decoded for skipped batches).
- **Checkpoints** are written to ``step_XXXXXXX.tmp``, completed with ``trainer_state.json`` and a ``COMPLETE``
  marker, then renamed (atomic on one filesystem). ``--resume latest`` takes the newest directory that has the
  marker; ``.tmp`` directories and unmarked ones (an interrupted save, a partial copy) are ignored. A checkpoint
  records the number of processes and the global batch; it resumes with any number of processes (``save_state``
  keeps the main process's weights and optimizer), and replays the uninterrupted run's batches when the global
  batch is the same (two processes of 4 -> one of 8); with another global batch it warns and goes on.
- **A non-finite loss** (checked on every process before ``backward``) stops the run with an error naming the
  step; no optimizer step is taken and nothing is saved from that step.
- **The scheduler** is stepped by hand once per optimizer step and registered for checkpointing (accelerate's
  prepared scheduler would step once per process).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from training.config import RunConfig, RunConfigError, load_config

if TYPE_CHECKING:
    from mklvisita.cards import ModelCard
    from mklvisita.config import RankingConfig

CHECKPOINT_PREFIX = "step_"
COMPLETE_MARKER = "COMPLETE"
TRAINER_STATE = "trainer_state.json"
# Parameter-name prefixes of the pretrained backbones (the timm ViT and the transformers text encoder).
BACKBONE_PREFIXES = ("vision.", "text.")
# The kernel-weight logits: beta of the multi-kernel similarity and each fusion level's mix of local kernels.
MIX_SUFFIXES = ("kernels.logits", "fusion.bias_logits")


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the run stops without saving."""


# ------------------------------------------------------------------------------------------------------ data


def build_train_dataset(cfg: RunConfig) -> Dataset:
    """The task's training pairs (:mod:`mklvisita.tasks`: the data spec names the task)."""
    from mklvisita.tasks import PairOptions, TaskError, get_task

    options = PairOptions(
        size=cfg.data.train_size,
        seed=cfg.data.shapes_seed,
        cache_dir=cfg.data.cache_dir,
        reverse_rate=cfg.data.reverse_negatives,
        undirected_rate=cfg.data.undirected_relations,
        photo_style=cfg.data.photo_style,
    )
    try:
        return get_task(cfg.data.train).train_pairs(cfg.data.train, cfg.data.train_split, options)
    except TaskError as e:
        raise RunConfigError(f"data.train: {e}") from e


class EpochSampler(Sampler[int]):
    """A permutation that depends only on ``(seed, epoch)``, truncated to ``length`` and started at ``start``."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed
        self.epoch, self.start, self.length = 0, 0, n

    # Not named set_epoch: accelerate's DataLoaderShard calls sampler.set_epoch(its own counter) on every iter(),
    # which would reset the resume offset.
    def set_position(self, epoch: int, start: int = 0, length: int | None = None) -> None:
        self.epoch, self.start, self.length = epoch, start, self.n if length is None else length

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        perm = torch.randperm(self.n, generator=g)[: self.length]
        return iter(perm[self.start :].tolist())

    def __len__(self) -> int:
        return self.length - self.start


# ------------------------------------------------------------------------------------------ optimisation


def param_groups(model: torch.nn.Module, cfg: RunConfig) -> list[dict[str, Any]]:
    """AdamW groups: backbone / new / kernel-mix parameters (lr), and decay vs no decay (biases, norms, scalars)."""
    groups: dict[tuple[str, bool], list[torch.nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        kind = "backbone" if name.startswith(BACKBONE_PREFIXES) else "mix" if name.endswith(MIX_SUFFIXES) else "new"
        decay = p.ndim >= 2 and "norm" not in name.lower() and "embedding" not in name.lower()
        groups.setdefault((kind, decay), []).append(p)
    mult = {"backbone": cfg.optim.backbone_lr_mult, "mix": cfg.optim.mix_lr_mult, "new": 1.0}
    out = []
    for (kind, decay), params in sorted(groups.items()):
        out.append(
            {
                "params": params,
                "lr": cfg.optim.lr * mult[kind],
                "weight_decay": cfg.optim.weight_decay if decay else 0.0,
                "name": f"{kind}/{'decay' if decay else 'no_decay'}",
            }
        )
    return out


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup to 1 over ``warmup`` steps, then cosine decay to ``min_ratio`` at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


# ------------------------------------------------------------------------------------------- checkpoints


def checkpoint_dir(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / "checkpoints" / f"{CHECKPOINT_PREFIX}{step:07d}"


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints (marker present, not ``.tmp``), oldest first."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        step = d.name[len(CHECKPOINT_PREFIX) :]
        if d.is_dir() and d.name.startswith(CHECKPOINT_PREFIX) and step.isdigit() and (d / COMPLETE_MARKER).is_file():
            found.append((int(step), d))
    return [d for _, d in sorted(found)]


def resolve_resume(resume: str | None, output_dir: str | Path) -> Path | None:
    """``latest`` -> the newest complete checkpoint (None if there is none); a path must be complete."""
    if resume is None:
        return None
    if resume == "latest":
        done = complete_checkpoints(output_dir)
        return done[-1] if done else None
    path = Path(resume)
    if not (path / COMPLETE_MARKER).is_file():
        raise FileNotFoundError(f"--resume {resume}: not a complete checkpoint (no {COMPLETE_MARKER} marker in it)")
    return path


def save_checkpoint(
    accelerator: Any, output_dir: str | Path, step: int, epoch: int, keep: int, global_batch: int = 0
) -> Path:
    """``save_state`` into ``step_X.tmp``, mark it complete, then rename it: a crash never leaves a resumable half.
    ``global_batch``: captions per optimizer step over all processes (recorded for resuming)."""
    final = checkpoint_dir(output_dir, step)
    tmp = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        state = {"step": step, "epoch": epoch, "num_processes": accelerator.num_processes, "global_batch": global_batch}
        (tmp / TRAINER_STATE).write_text(json.dumps(state) + "\n")
        (tmp / COMPLETE_MARKER).write_text(f"step {step}\n")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        if keep > 0:
            for old in complete_checkpoints(output_dir)[:-keep]:
                (old / COMPLETE_MARKER).unlink()  # first, so a kill mid-delete leaves no "complete" husk
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


# -------------------------------------------------------------------------------------------------- train


def resolve_mixed_precision(requested: str, cpu: bool = False, say: bool = True) -> str:
    """The mixed precision accelerate gets: ``requested`` where the device has it, else ``"no"`` (fp32), said on
    stderr. The recipes' bf16 / fp16 are GPU settings: with no GPU (or ``cpu``, as under ``accelerate launch
    --cpu``) the run trains in fp32 instead of failing (fp16 needs a GPU) or crawling through CPU autocast (bf16);
    bf16 on a CUDA GPU without bf16 support (before Ampere) also trains in fp32. ``say``: print the fallback (the
    main process does)."""
    if requested == "no":
        return requested
    mps = getattr(torch.backends, "mps", None)
    xpu = getattr(torch, "xpu", None)
    cuda = torch.cuda.is_available() and not cpu
    gpu = not cpu and (cuda or any(d is not None and d.is_available() for d in (mps, xpu)))
    if not gpu:
        why = "no GPU found" if not cpu else "running on the CPU"
    elif requested == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        why = f"{torch.cuda.get_device_name()} has no bf16"
    else:
        return requested
    if say:
        print(f"mixed_precision={requested}: {why}, training in fp32", file=sys.stderr)
    return "no"


def _target_grid(model: Any) -> tuple[int, int]:
    """The grid of the dense targets: the fusion's attention maps (its image stream's grid), else the last level."""
    if model.fusion is not None and model.fusion.image_grids:
        return tuple(model.fusion.image_grids[0])
    return tuple(model.vision.grid)


def build_model_and_processor(cfg: RunConfig) -> tuple[Any, Any]:
    from mklvisita import MKLVisITA
    from mklvisita.inputs import Processor

    if not cfg.init_from:
        model = MKLVisITA(cfg.model_config())
        return model, Processor(model.config, model.tokenizer)
    try:
        source = MKLVisITA.from_pretrained(cfg.init_from)
    except (ValueError, OSError) as e:
        raise RunConfigError(f"init_from: cannot load the checkpoint ({e})") from e
    config = cfg.model_config()
    config.text.backbone_config = source.config.text.backbone_config  # loaded, not built: sources take the weights
    model = MKLVisITA(config, tokenizer=source.tokenizer)
    # Every weight of the run's model from the checkpoint, except modules that start at zero (new relative-position
    # projections: the function starts as the checkpoint's) and those ``init_new`` names; nothing of the checkpoint
    # left over.
    new = {k for k in model.state_dict() if any(k.startswith(p) for p in cfg.init_new)}
    fresh = (model.zero_start_keys() | new) - set(source.state_dict())
    try:
        model.load_state_dict({**{k: model.state_dict()[k] for k in fresh}, **source.state_dict()})  # strict
    except RuntimeError as e:
        first = str(e).splitlines()[1:2] or [str(e)]
        raise RunConfigError(
            f"init_from: the checkpoint's weights do not fit this run's model ({first[0].strip()}); "
            "use the checkpoint's model settings (fusion, kernels, encoders) in the run config"
        ) from e
    if fresh:
        first = min(fresh)
        print(f"init_from: {len(fresh)} weights start fresh (zero-start or init_new: {first}, ...)", file=sys.stderr)
    return model, Processor(model.config, model.tokenizer)


def train(cfg: RunConfig, resume: str | None = None, push_to_hub: str | None = None) -> dict[str, Any]:
    """Run (or resume) a training run; returns the final metrics (empty when stopped early by ``stop_after``)."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration, set_seed
    from tqdm.auto import tqdm

    from mklvisita.evaluation import evaluate_model, load_eval_data
    from mklvisita.tasks import TrainCollate, get_task
    from training.distributed import MetadataCollate, global_batch_loss, mean_over_processes

    out_dir = Path(cfg.output_dir)
    # accelerate only goes multi-process on CPUs when asked for the CPU; torchrun on a GPU-less host would otherwise
    # start N independent single-process runs that all write the same files.
    multi_cpu = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    on_cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")  # accelerate launch --cpu
    precision = resolve_mixed_precision(cfg.mixed_precision, cpu=on_cpu, say=os.environ.get("RANK", "0") == "0")
    accelerator = Accelerator(
        cpu=multi_cpu,
        gradient_accumulation_steps=cfg.grad_accum_steps,
        mixed_precision=precision,
        log_with="tensorboard",
        project_config=ProjectConfiguration(project_dir=str(out_dir), logging_dir=str(out_dir / "logs")),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=cfg.find_unused_parameters)],
    )
    set_seed(cfg.seed)
    if accelerator.is_main_process:
        cfg.save(out_dir)

    model, processor = build_model_and_processor(cfg)
    n_proc = accelerator.num_processes
    if n_proc > 1:  # the same initial weights everywhere, then one random stream per process
        set_seed(cfg.seed + accelerator.process_index)
    dataset = build_train_dataset(cfg)
    sampler = EpochSampler(len(dataset), cfg.seed)
    if cfg.data.feature_cache:
        from training.photo_cache import install_feature_cache

        install_feature_cache(model)
    loss_cfg = model.config.loss
    task = get_task(cfg.data.train)
    collate = TrainCollate(
        processor,
        task,
        cfg.data.hard_negatives,
        dense=any(w > 0 for w in (loss_cfg.patch_weight, loss_cfg.grounding_weight, loss_cfg.relation_weight)),
        grid=_target_grid(model),
    )
    # Several processes: the ITC covers the global batch, whose positives mask needs every process's items.
    global_itc = n_proc > 1 and loss_cfg.itc_weight > 0
    loader = DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        sampler=sampler,
        drop_last=True,
        collate_fn=MetadataCollate(collate) if global_itc else collate,
        num_workers=cfg.data.num_workers,
        generator=torch.Generator().manual_seed(cfg.seed),  # worker seeds must not consume the global RNG
    )
    steps_per_epoch = len(dataset) // (cfg.batch_size * n_proc) // cfg.grad_accum_steps
    if steps_per_epoch == 0:
        raise RunConfigError(
            f"{len(dataset)} training pairs do not fill one step of {cfg.batch_size} x {cfg.grad_accum_steps} "
            f"x {n_proc} processes; lower batch_size or grad_accum_steps"
        )
    samples_per_step = cfg.batch_size * n_proc * cfg.grad_accum_steps
    accelerator.print(
        f"{n_proc} process{'es' if n_proc > 1 else ''} on {accelerator.device.type}, {samples_per_step} captions "
        f"per step (batch_size {cfg.batch_size} per process x grad_accum_steps {cfg.grad_accum_steps}), "
        f"precision {precision}"
    )
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch

    optimizer = torch.optim.AdamW(param_groups(model, cfg), lr=cfg.optim.lr, betas=cfg.optim.betas)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, cfg.optim.warmup_steps, total_steps, cfg.optim.min_lr_ratio)
    )
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    accelerator.register_for_checkpointing(scheduler)

    step = 0
    ckpt = resolve_resume(resume, out_dir)
    if ckpt is not None:
        accelerator.load_state(str(ckpt))
        state = json.loads((ckpt / TRAINER_STATE).read_text())
        step = state["step"]
        accelerator.print(f"resumed from {ckpt} at step {step}")
        if state.get("global_batch", samples_per_step) != samples_per_step:
            accelerator.print(
                f"warning: the checkpoint was written with {state['global_batch']} captions per step "
                f"({state.get('num_processes', '?')} processes), this run takes {samples_per_step} "
                f"({n_proc} x batch_size {cfg.batch_size} x grad_accum_steps {cfg.grad_accum_steps}): the rest of the "
                "run does not replay the uninterrupted run's batches; set batch_size so that the products match"
            )
        if accelerator.is_main_process:
            _truncate_log(out_dir / "losses.jsonl", step)  # steps after the checkpoint are about to be redone
    elif resume is not None:
        accelerator.print(f"--resume {resume}: no complete checkpoint in {out_dir / 'checkpoints'}; starting fresh")

    eval_data = load_eval_data(cfg.data.eval, cfg.data.eval_split, cfg.data.eval_limit) if cfg.data.eval else None
    tracked = {**cfg.to_dict(), "num_processes": n_proc, "global_batch": samples_per_step, "precision": precision}
    accelerator.init_trackers("train", config=_flat_scalars(tracked))
    loss_log = out_dir / "losses.jsonl"
    history: list[dict[str, Any]] = []
    if accelerator.is_main_process and (out_dir / "metrics.json").is_file() and ckpt is not None:
        history = [h for h in json.loads((out_dir / "metrics.json").read_text()) if h["step"] <= step]

    def run_eval() -> dict[str, float]:
        metrics: dict[str, float] = {}
        if eval_data is not None and accelerator.is_main_process:
            metrics = evaluate_model(
                accelerator.unwrap_model(model),
                processor,
                eval_data,
                k=cfg.eval.k,
                itm_weight=cfg.eval.itm_weight,
                batch_size=cfg.eval.batch_size,
                extra_metrics=None if cfg.eval.extra_metrics else {},
            )
            history.append({"step": step, **metrics})
            (out_dir / "metrics.json").write_text(json.dumps(history, indent=2) + "\n")
            accelerator.log({f"eval/{k}": v for k, v in metrics.items()}, step=step)
            accelerator.print(f"step {step}: " + " ".join(f"{k}={v:.2f}" for k, v in metrics.items()))
        accelerator.wait_for_everyone()
        return metrics

    bar = tqdm(total=total_steps, initial=step, desc="train", disable=not accelerator.is_local_main_process)
    model.train()
    metrics: dict[str, float] = {}
    stop_at = min(total_steps, cfg.stop_after) if cfg.stop_after > 0 else total_steps
    while step < stop_at:
        epoch, done_in_epoch = divmod(step, steps_per_epoch)
        sampler.set_position(epoch, start=done_in_epoch * samples_per_step, length=steps_per_epoch * samples_per_step)
        t0, terms_sum = time.perf_counter(), {}
        for batch in loader:
            with accelerator.accumulate(model):
                if global_itc:  # the gathered ITC runs outside the prepared forward: autocast it as the forward is
                    with accelerator.autocast():
                        unwrapped = accelerator.unwrap_model(model)
                        out, loss, losses = global_batch_loss(model, unwrapped, batch, task, loss_cfg.itc_weight)
                else:
                    out = model(**batch, return_loss=True)
                    loss, losses = out.loss, out.losses
                finite = torch.isfinite(loss.detach()).float()
                if accelerator.reduce(finite, reduction="sum").item() < n_proc:
                    raise NonFiniteLossError(
                        f"non-finite loss at step {step + 1} (epoch {epoch}): "
                        + ", ".join(f"{k}={float(v.detach()):.4g}" for k, v in losses.items())
                        + "; stopped without an optimizer step or a checkpoint. Lower optim.lr, check the data, "
                        "or resume from the last checkpoint with --resume latest"
                    )
                accelerator.backward(loss)
                if accelerator.sync_gradients and cfg.optim.grad_clip > 0:
                    accelerator.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            # Loss terms plus the model's own detached logs (kernel entropy, temperature, ITM accuracy): sum and
            # count per name, as a term can be missing from a micro-batch (no relation caption in it).
            for k, v in {"loss": loss, **losses, **getattr(out, "logs", {})}.items():
                total, n = terms_sum.get(k, (0.0, 0))
                terms_sum[k] = (total + float(v.detach() if torch.is_tensor(v) else v), n + 1)
            if not accelerator.sync_gradients:
                continue
            scheduler.step()
            step += 1
            bar.update(1)
            terms = mean_over_processes(terms_sum, n_proc)
            terms_sum = {}
            if accelerator.is_main_process:
                with loss_log.open("a") as f:
                    f.write(json.dumps({"step": step, **terms, "lr": scheduler.get_last_lr()[0]}) + "\n")
            if step % cfg.log_every == 0 or step == stop_at:
                dt = time.perf_counter() - t0
                accelerator.log(
                    {
                        **{f"train/{k}": v for k, v in terms.items()},
                        "train/lr": scheduler.get_last_lr()[0],
                        "train/step_time": dt,
                    },
                    step=step,
                )
                bar.set_postfix(loss=f"{terms['loss']:.3f}")
            t0 = time.perf_counter()
            epoch_end = step % steps_per_epoch == 0
            if (cfg.eval.every_steps and step % cfg.eval.every_steps == 0) or epoch_end or step == total_steps:
                metrics = run_eval()
            if cfg.save_every and step % cfg.save_every == 0:
                save_checkpoint(accelerator, out_dir, step, epoch, cfg.keep_checkpoints, samples_per_step)
            if epoch_end or step >= stop_at:
                break
    bar.close()
    if step < total_steps:  # stopped by stop_after: as if killed, no release
        accelerator.end_training()
        return {}
    if accelerator.is_main_process:
        if not metrics:  # a finished run resumed with --resume latest: its final evaluation is in the history
            final = [h for h in history if h.get("step") == step]
            metrics = {k: v for k, v in final[-1].items() if k != "step"} if final else {}
        release = out_dir / "release"
        write_release(accelerator.unwrap_model(model), processor, cfg, metrics, release, total_steps)
        if push_to_hub:
            from huggingface_hub import HfApi

            api = HfApi()
            api.create_repo(push_to_hub, exist_ok=True)
            api.upload_folder(repo_id=push_to_hub, folder_path=str(release))
            accelerator.print(f"pushed {release} to https://huggingface.co/{push_to_hub}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return metrics


def write_release(
    model: Any, processor: Any, cfg: RunConfig, metrics: dict[str, float], release: Path, steps: int
) -> None:
    """Weights + tokenizer, metrics.json (when evaluated) and a model card, written as one crash-safe save (a kill
    leaves the previous release or this one whole, never a card or metrics of another run)."""
    files = {"README.md": model_card(cfg, metrics, steps, model.config.ranking, fusion=model.has_itm)}
    if metrics:
        files["metrics.json"] = json.dumps(metrics, indent=2) + "\n"
    model.save_pretrained(str(release), files=files)
    if not any(release.glob("tokenizer*")):
        processor.save_pretrained(release)


def effective_ranking(cfg: RunConfig, ranking: RankingConfig) -> RankingConfig:
    """The ranking rule the run's evaluation used: the model's ``ranking`` with the run's ``eval.k`` and
    ``eval.itm_weight`` where they are set (:func:`mklvisita.ranking.resolve_ranking`, as
    :func:`mklvisita.evaluation.evaluate_model` applies them)."""
    from mklvisita.ranking import resolve_ranking

    return resolve_ranking(ranking, k=cfg.eval.k, itm_weight=cfg.eval.itm_weight)


def training_card(
    cfg: RunConfig, metrics: dict[str, float], steps: int, ranking: RankingConfig, fusion: bool = True
) -> ModelCard:
    """The release's card as data (:class:`mklvisita.cards.ModelCard`). ``ranking``: the model's ``config.ranking``
    (the card states the effective rule, with the run's eval overrides applied); ``fusion``: whether the model has
    the ITM head. What the data teaches and cannot teach comes from the training task (``TRAINED_ON``,
    ``CANNOT_KNOW`` of its module in :mod:`mklvisita.tasks`)."""
    import yaml

    from mklvisita.cards import Evaluation, ModelCard
    from mklvisita.ranking import describe_ranking
    from mklvisita.tasks import get_task

    task = get_task(cfg.data.train)
    rule = describe_ranking(effective_ranking(cfg, ranking), fusion, retrieval=True)
    start = f", starting from the weights of `{cfg.init_from}` (fine-tuned)" if cfg.init_from else ""
    evaluations = []
    numbers = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if numbers:
        scope = "all images" if cfg.data.eval_limit == 0 else f"first {cfg.data.eval_limit} images"
        evaluations.append(
            Evaluation(
                name=f"End of training: {cfg.data.eval}, split {cfg.data.eval_split} ({scope})",
                data=cfg.data.eval,
                split=cfg.data.eval_split,
                metrics=numbers,
                source="metrics.json in this folder",
                command="python -m training.train --config <the run's config>",
                note=f"Retrieval by the checkpoint's ranking rule: {rule}. Recall@K and mAP are percentages; "
                "accuracies are fractions. Held-out figures come from `python -m training.evaluate`.",
            )
        )
    run_config = yaml.safe_dump(json.loads(json.dumps(cfg.to_dict(), default=list)), sort_keys=False).rstrip()
    return ModelCard(
        title="MKL-VisITA checkpoint",
        summary=f"Trained with `python -m training.train` on `{cfg.data.train}` (split `{cfg.data.train_split}`) for "
        f"{steps} optimizer steps, batch size {cfg.batch_size} x {cfg.grad_accum_steps} accumulation per process, "
        f"seed {cfg.seed}{start}.",
        data=cfg.data.train,
        trained_on=task.trained_on or f"`{cfg.data.train}` (split `{cfg.data.train_split}`)",
        cannot_know=task.cannot_know,
        details=f"Ranking rule (`config.ranking`): {rule}.",
        intended_use="Scoring and explaining image-caption pairs like those of its training data, and research on "
        "multi-kernel image-text matching.",
        evaluations=evaluations,
        sections={"Training config": f"```yaml\n{run_config}\n```"},
        tags=["image-text-matching", "retrieval", "multi-kernel-learning", "vision-transformer"],
    )


def model_card(
    cfg: RunConfig, metrics: dict[str, float], steps: int, ranking: RankingConfig, fusion: bool = True
) -> str:
    """The release's README.md: :func:`training_card` written by :func:`mklvisita.cards.render_card`."""
    from mklvisita.cards import render_card

    return render_card(training_card(cfg, metrics, steps, ranking, fusion))


def _truncate_log(path: Path, step: int) -> None:
    if path.is_file():
        kept = []
        for line in path.read_text().splitlines():
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line)
            except (json.JSONDecodeError, KeyError, TypeError):
                pass  # a line cut short by a kill
        path.write_text("".join(line + "\n" for line in kept))


def _flat_scalars(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out |= _flat_scalars(v, f"{prefix}{k}.")
        elif isinstance(v, (int, float, str, bool)):
            out[f"{prefix}{k}"] = v
        else:
            out[f"{prefix}{k}"] = str(v)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="YAML run config, e.g. training/configs/shapes.yaml")
    parser.add_argument("--resume", default=None, help="'latest' (newest complete checkpoint) or a checkpoint dir")
    parser.add_argument("--push-to-hub", default=None, metavar="REPO", help="upload the release folder to this repo")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. optim.lr=1e-4")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except (RunConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from mklvisita.processes import launch_cpu_processes, requested_cpu_processes

    n = requested_cpu_processes()
    if n > 1:  # `accelerate launch --cpu --num_processes N` started this process alone: start the N here
        return launch_cpu_processes(n, "training.train", sys.argv[1:] if argv is None else argv, "training")
    try:
        train(cfg, resume=args.resume, push_to_hub=args.push_to_hub)
    except NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except RunConfigError as e:  # found while building the run (data spec, init_from): a message, not a traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
