"""PromptDataModule: the prompts (with answers and images) of each RL step, and an exact resume of the data
position from a checkpoint."""

from __future__ import annotations

import re
import string
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from relax_pl.data.sources import DataError, Rows, is_hub_id, load_rows, looks_like_path
from relax_pl.errors import RecipeError


def template_fields(template: str) -> list[str]:
    """The row columns a prompt template refers to, besides ``{prompt}``.

    Raises:
        ValueError: the template is not a valid format string, or it has a positional field (``{}``, ``{0}``).
    """
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as error:
        raise ValueError(f"prompt_template {template!r} is not a valid format string: {error}") from None
    fields: list[str] = []
    for _, name, _, _ in parsed:
        if name is None:
            continue
        root = re.split(r"[.\[]", name, maxsplit=1)[0]
        if not root or root.isdigit():
            raise ValueError(
                f"prompt_template {template!r} has a positional field {{{name}}}: name a column, e.g. {{prompt}}"
            )
        if root != "prompt" and root not in fields:
            fields.append(root)
    return fields


IMAGE_PLACEHOLDER = "<image>"


def build_messages(
    prompt: str, system_prompt: str | None, num_images: int = 0, placeholder: str = IMAGE_PLACEHOLDER
) -> list[dict[str, Any]]:
    """The chat of one prompt: an optional system turn, then the user turn.

    With images the user turn is a list of content parts (the form vision-language chat templates render):
    each ``placeholder`` in the prompt becomes an ``{"type": "image"}`` part at its place, in order, and the
    text around it ``{"type": "text", "text": ...}`` parts. A prompt without placeholders gets its images
    before the text, as in Qwen-VL's own examples.

    Raises:
        ValueError: the prompt holds placeholders, but not one per image.
    """
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    if num_images == 0:
        return [*system, {"role": "user", "content": prompt}]
    pieces = prompt.split(placeholder)
    if len(pieces) == 1:
        pieces = [""] * num_images + [prompt]
    elif len(pieces) - 1 != num_images:
        raise ValueError(f"the prompt holds {len(pieces) - 1} {placeholder} placeholders for {num_images} images")
    parts: list[dict[str, str]] = []
    for i, piece in enumerate(pieces):
        if i:
            parts.append({"type": "image"})
        if piece:
            parts.append({"type": "text", "text": piece})
    return [*system, {"role": "user", "content": parts}]


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _lone_surrogate(text: str) -> int | None:
    """The position of the first character of ``text`` that UTF-8 cannot encode (half a surrogate pair), or None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        return error.start
    return None


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, (list, tuple)) and len(value) == 0)


class PromptDataset(Dataset):
    """One split of a source, as prompt samples (see :class:`PromptDataModule` for the fields of a sample).

    Rows are checked by :meth:`validate` (all at once) and again when read, with the same messages.
    """

    def __init__(
        self,
        rows: Rows,
        prompt_key: str = "problem",
        answer_key: str = "answer",
        image_key: str | None = None,
        system_prompt: str | None = None,
        prompt_template: str = "{prompt}",
        image_placeholder: str = IMAGE_PLACEHOLDER,
    ) -> None:
        self.rows = rows
        self.prompt_key = prompt_key
        self.answer_key = answer_key
        self.image_key = image_key
        self.system_prompt = system_prompt
        self.prompt_template = prompt_template
        self.template_fields = template_fields(prompt_template)
        self.image_placeholder = image_placeholder
        self.indices: list[int] | None = None  # the rows kept by keep_short_prompts; None: all
        self.skipped: list[int] = []

    def __len__(self) -> int:
        return len(self.rows) if self.indices is None else len(self.indices)

    def __getitem__(self, position: int) -> dict[str, Any]:
        index = position if self.indices is None else self.indices[position]
        row = self.rows[index]
        prompt, answer = self._render(row, index)
        images = None
        messages = build_messages(prompt, self.system_prompt)
        if self.image_key is not None:
            images = [self.rows.load_image(value, index) for value in _as_list(row[self.image_key])]
            try:
                messages = build_messages(prompt, self.system_prompt, len(images), self.image_placeholder)
            except ValueError as error:
                raise DataError(f"{self.rows.locate(index)}: {error} (field {self.prompt_key!r})") from None
        own = (self.prompt_key, self.answer_key, self.image_key)
        other = {key: value for key, value in row.items() if key not in own}
        # the fixed fields win over same-named columns: every consumer relies on them
        return {
            **other,
            "prompt": prompt,
            "messages": messages,
            "answer": answer,
            "images": images,
            "source": self.rows.source,
            "row": index,
        }

    def keep_short_prompts(self, count_tokens: Callable[[dict[str, Any]], int], max_tokens: int) -> list[int]:
        """Keep only the rows whose prompt has at most ``max_tokens`` tokens as ``count_tokens(sample)`` counts
        them (once: later calls keep the first result); warns naming the rows left out and returns them.

        Raises:
            DataError: no row is short enough.
        """
        if self.indices is None:
            lengths = [count_tokens(self[i]) for i in range(len(self.rows))]
            self.skipped = [i for i, n in enumerate(lengths) if n > max_tokens]
            self.indices = [i for i, n in enumerate(lengths) if n <= max_tokens]
            where = f"{self.rows.where}" + (f" split {self.rows.split!r}" if self.rows.split is not None else "")
            if not self.indices:
                raise DataError(f"{where}: every prompt is longer than {max_tokens} tokens (longest {max(lengths)})")
            if self.skipped:
                rank_zero_warn(
                    f"{where}: left out {len(self.skipped)} of {len(lengths)} rows whose prompt is longer than "
                    f"{max_tokens} tokens (sampling.max_prompt_tokens, image tokens included): rows {self.skipped[:20]}"
                    + (" ..." if len(self.skipped) > 20 else "")
                )
        return self.skipped

    def validate(self) -> None:
        """Check every row now, so that a bad row fails at ``setup()`` rather than hours into training.

        Raises:
            DataError: naming the source, split, row and field of the first bad row.
        """
        columns = [self.prompt_key, self.answer_key, *self.template_fields]
        for index, row in enumerate(self.rows.scan(columns, present=self.image_key)):
            prompt, _ = self._render(row, index)
            if self.image_key is None:
                continue
            values = _as_list(row[self.image_key])
            for value in values:
                if isinstance(value, str) and not self.rows.image_path(value).is_file():
                    path = str(self.rows.image_path(value))
                    where = self.rows.locate(index)
                    raise DataError(f"{where}: image file {path!r} (field {self.image_key!r}) does not exist")
            if not any(v is True for v in values):  # in-memory rows hold images; a scanned dataset marks them True
                try:
                    build_messages(prompt, None, len(values), self.image_placeholder)
                except ValueError as error:
                    raise DataError(f"{self.rows.locate(index)}: {error} (field {self.prompt_key!r})") from None

    def _render(self, row: dict[str, Any], index: int) -> tuple[str, str]:
        """The templated prompt and the answer string of a row, or a DataError naming the bad field."""
        where = self.rows.locate(index)
        prompt = row.get(self.prompt_key)
        if prompt is None:
            raise DataError(f"{where}: missing prompt field {self.prompt_key!r} (fields: {self.rows.fields(row)})")
        if not isinstance(prompt, str):
            raise DataError(f"{where}: prompt field {self.prompt_key!r} must be a string, got {type(prompt).__name__}")
        answer = row.get(self.answer_key)
        if answer is None:
            raise DataError(f"{where}: missing answer field {self.answer_key!r} (fields: {self.rows.fields(row)})")
        if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
            kind = type(answer).__name__
            raise DataError(f"{where}: answer field {self.answer_key!r} must be a string or a number, got {kind}")
        if self.image_key is not None and _is_missing(row.get(self.image_key)):
            raise DataError(f"{where}: missing image field {self.image_key!r} (fields: {self.rows.fields(row)})")
        for key in (self.prompt_key, self.answer_key, *self.template_fields):
            if isinstance(row.get(key), str) and (position := _lone_surrogate(row[key])) is not None:
                raise DataError(
                    f"{where}: field {key!r} holds a lone surrogate {row[key][position]!r} at character {position}, "
                    "which no tokenizer can encode; fix the row (a JSON \\ud800-\\udfff escape must be one of a pair)"
                )
        try:
            text = self.prompt_template.format_map({**row, "prompt": prompt})
        except (KeyError, AttributeError, IndexError) as error:
            raise DataError(f"{where}: prompt_template {self.prompt_template!r} cannot be filled: {error!r}") from None
        return text, str(answer)


class ResumableSampler(DistributedSampler):
    """Serves the ``k``-th trained batch of a run from one fixed stream, so a resumed run trains on the same
    batches as an uninterrupted one.

    Stream batch ``k`` is batch ``k % n`` of data epoch ``k // n`` (``n`` full batches per epoch; the order of an
    epoch depends only on ``seed`` and the epoch, as in ``DistributedSampler``, one shard per rank). Each new
    iterator asks ``position()`` how many batches the run has trained and serves from there to the end of that
    data epoch. The position is asked, not counted from what was yielded: the DataLoader fetches ahead, and after
    a resume Lightning may number epochs differently from the interrupted run (it does after a checkpoint
    written at the end of training), but it always pulls the remaining batches of the data epoch first.

    Being a ``DistributedSampler``, Lightning keeps it on several devices instead of wrapping it; the epoch that
    Lightning passes to ``set_epoch`` is replaced by the one the position gives.
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        position: Callable[[], int],
        num_replicas: int = 1,
        rank: int = 0,
        shuffle: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self.batch_size = batch_size
        self.position = position
        self.batches_per_epoch = self.num_samples // batch_size

    def __iter__(self):
        epoch, batch = divmod(self.position(), self.batches_per_epoch)
        self.set_epoch(epoch)
        indices = list(super().__iter__())
        return iter(indices[batch * self.batch_size : self.batches_per_epoch * self.batch_size])


def iterator_seeds(seed: int) -> torch.Generator:
    """The generator a DataLoader draws each iterator's base seed from. Without one it draws from torch's global
    generator, which sampling draws from too: a run that starts a new epoch's iterator between two steps would sample
    step 2 with other numbers than a run resumed from the checkpoint written after step 1 (its generators are
    restored after the iterator is made, so its draw is undone)."""
    return torch.Generator().manual_seed(seed)


class ResumableDataLoader(DataLoader):
    """A DataLoader over a :class:`ResumableSampler`, which declares itself resumable as Lightning asks of a loader it
    resumes mid-epoch: its position is Lightning's own batch counter, restored with the checkpoint before the first
    batch is drawn, so there is nothing of its own to load (and Lightning does not warn that the resume is
    unreliable)."""

    def state_dict(self) -> dict[str, int]:
        return {"trained_batches": self.sampler.position()}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        """Nothing to restore: the position comes from Lightning's restored batch counter."""


class PromptDataModule(L.LightningDataModule):
    """Prompts for RL with verifiable rewards, from a built-in task, a JSONL file, a local dataset folder or a
    Hugging Face hub dataset (see :mod:`relax_pl.data.sources` for the forms of ``train_source``).

    Each training step gets one batch: a ``list`` of ``batch_size`` samples (the last incomplete batch of an
    epoch is dropped), each a dict::

        {"prompt": str,            # prompt_template filled with the row
         "messages": [{"role": "system", "content": system_prompt},   # only when system_prompt is set
                      {"role": "user", "content": prompt}],
         "answer": str,            # the answer column (numbers become strings)
         "images": list | None,    # PIL images of the image column; None without image_key
         "source": str, "row": int,  # the source string and the row's index in that split
         ...}                      # every other column of the row, unchanged

    The module applies the tokenizer's chat template to ``messages``.

    Args:
        train_source: where training prompts come from: ``builtin:<task>``, a ``.jsonl``/``.parquet`` file, a
            local dataset folder or a hub dataset id.
        train_split: split of ``train_source`` (ignored for a single file, which is its own split).
        val_source: where validation prompts come from; None for no validation.
        val_split: split of ``val_source``.
        prompt_key: column holding the question.
        answer_key: column holding the reference answer.
        image_key: column holding the image(s) (PIL images, paths relative to the JSONL file, or lists of
            them); None for text-only prompts.
        image_placeholder: where an image goes in the prompt text (Geometry3K: ``<image>``); the user turn then
            becomes content parts with the images at their places (see :func:`build_messages`).
        system_prompt: content of a system turn placed before every prompt; None for none.
        prompt_template: a ``str.format`` template for the user turn: ``{prompt}`` is the ``prompt_key`` column
            and any other ``{column}`` of the row may be used, e.g. ``"{prompt}\\nChoices: {choices}"``.
            Literal braces are doubled: ``"\\\\boxed{{}}"``.
        batch_size: prompts per training step (per device).
        val_batch_size: prompts per validation batch.
        max_train_samples: keep only the first rows of the training split; None keeps all.
        max_val_samples: keep only the first rows of the validation split; None keeps all.
        shuffle: reshuffle the training prompts every epoch (the order depends only on ``seed`` and the epoch).
        seed: seed of the training order.
        num_workers: DataLoader worker processes.
        task_options: keyword options of a built-in task, e.g. ``{"digits": 2, "operations": "+-"}`` for
            ``builtin:arithmetic``.

    Every row is checked at ``setup()``: a missing prompt, answer or image field, a prompt that is not a
    string, a JSONL line that is not a JSON object, or a missing image file raises :class:`DataError` naming
    the source, split, row and field.

    Resuming: the ``k``-th batch a run trains on depends only on ``k`` and on the order settings (rows,
    ``batch_size``, devices, ``shuffle``, ``seed``; see :class:`ResumableSampler`), and ``k`` is Lightning's own
    batch counter, restored from the checkpoint. A run resumed from any checkpoint (written at a batch end, after
    validation, at an epoch end or at the end of training) therefore trains on exactly the batches an
    uninterrupted run would have. :meth:`state_dict` saves the order settings, and a resumed run whose settings
    differ warns that its batches will differ.

    Example::

        data = PromptDataModule("builtin:arithmetic", val_source="builtin:arithmetic",
                                task_options={"digits": 2}, system_prompt="Put the answer in \\\\boxed{}.")
    """

    def __init__(
        self,
        train_source: str,
        train_split: str = "train",
        val_source: str | None = None,
        val_split: str = "test",
        prompt_key: str = "problem",
        answer_key: str = "answer",
        image_key: str | None = None,
        image_placeholder: str = IMAGE_PLACEHOLDER,
        system_prompt: str | None = None,
        prompt_template: str = "{prompt}",
        batch_size: int = 4,
        val_batch_size: int = 16,
        max_train_samples: int | None = None,
        max_val_samples: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
        num_workers: int = 0,
        task_options: dict | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("batch_size", batch_size), ("val_batch_size", val_batch_size)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        for name, value in (("max_train_samples", max_train_samples), ("max_val_samples", max_val_samples)):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 or None, got {value}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        template_fields(prompt_template)  # fail on a bad template before any data is read
        for key, source in (("data.train_source", train_source), ("data.val_source", val_source)):
            if source is not None and looks_like_path(source) and not Path(source).expanduser().exists():
                where = str(Path(source).expanduser().absolute())
                raise RecipeError(key, source, f"no such file or folder ({where!r}); give the path of the data")
        self.save_hyperparameters()
        self.train_source = train_source
        self.train_split = train_split
        self.val_source = val_source
        self.val_split = val_split
        self.prompt_key = prompt_key
        self.answer_key = answer_key
        self.image_key = image_key
        self.image_placeholder = image_placeholder
        self.system_prompt = system_prompt
        self.prompt_template = prompt_template
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size
        self.max_train_samples = max_train_samples
        self.max_val_samples = max_val_samples
        self.shuffle = shuffle
        self.seed = seed
        self.num_workers = num_workers
        self.task_options = dict(task_options or {})
        self.train_data: PromptDataset | None = None
        self.val_data: PromptDataset | None = None
        self._resumed_order: dict[str, Any] | None = None

    def prepare_data(self) -> None:
        # download hub datasets once per node before every rank loads them from the cache in setup()
        for source, split in ((self.train_source, self.train_split), (self.val_source, self.val_split)):
            if source is not None and is_hub_id(source):
                load_rows(source, split)

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit") and self.train_data is None:
            self.train_data = self._dataset(self.train_source, self.train_split, self.max_train_samples)
        if stage in (None, "fit", "validate") and self.val_source is not None and self.val_data is None:
            self.val_data = self._dataset(self.val_source, self.val_split, self.max_val_samples)

    def _dataset(self, source: str, split: str, limit: int | None) -> PromptDataset:
        rows = load_rows(source, split, self.task_options).head(limit)
        if len(rows) == 0:
            raise DataError(f"data source {source!r} split {split!r} has no rows")
        dataset = PromptDataset(
            rows, self.prompt_key, self.answer_key, self.image_key, self.system_prompt, self.prompt_template,
            self.image_placeholder,
        )
        dataset.validate()
        return dataset

    def drop_long_prompts(self, count_tokens: Callable[[dict[str, Any]], int], max_tokens: int) -> int:
        """Leave out of the loaded splits the rows whose prompt is longer than ``max_tokens`` (counted by
        ``count_tokens(sample)``, e.g. the module's tokenizer and image processor); returns how many were left out.

        Called by the module's ``setup`` when ``sampling.on_long_prompt`` is ``"skip"``. Every rank drops the same
        rows, so ranks keep the same number of batches.
        """
        datasets = [d for d in (self.train_data, self.val_data) if d is not None]
        return sum(len(d.keep_short_prompts(count_tokens, max_tokens)) for d in datasets)

    def train_dataloader(self) -> DataLoader:
        if self.train_data is None:
            self.setup("fit")
        world_size, rank = (self.trainer.world_size, self.trainer.global_rank) if self.trainer else (1, 0)
        if len(self.train_data) < self.batch_size * world_size:
            raise DataError(
                f"data source {self.train_source!r} split {self.train_split!r} has {len(self.train_data)} rows,"
                f" fewer than batch_size={self.batch_size} x {world_size} device(s): not one full training batch"
            )
        order, resumed = self._order(), self._resumed_order
        if resumed is not None and resumed != order:
            rank_zero_warn(
                f"PromptDataModule resumes a run whose prompt order came from {resumed}, but this run has {order}:"
                " the batches after the resume will not be those the interrupted run would have trained on"
            )
        sampler = ResumableSampler(
            self.train_data,
            self.batch_size,
            position=self._trained_batches,
            num_replicas=world_size,
            rank=rank,
            shuffle=self.shuffle,
            seed=self.seed,
        )
        return ResumableDataLoader(
            self.train_data,
            batch_size=self.batch_size,
            sampler=sampler,
            drop_last=True,
            num_workers=self.num_workers,
            collate_fn=list,  # a batch is the list of its samples: prompts are not tensors
            generator=iterator_seeds(self.seed),
        )

    def val_dataloader(self) -> DataLoader | list:
        if self.val_source is None:
            return []  # Lightning runs no validation for an empty list
        if self.val_data is None:
            self.setup("validate")
        return DataLoader(
            self.val_data, batch_size=self.val_batch_size, shuffle=False, num_workers=self.num_workers, collate_fn=list,
            generator=iterator_seeds(self.seed),
        )

    def _trained_batches(self) -> int:
        """How many training batches the run has trained on, across resumes: Lightning's batch counter, which
        it saves in every checkpoint and restores before asking for the first batch."""
        if self.trainer is None:
            return 0
        return self.trainer.fit_loop.epoch_loop.batch_progress.total.processed

    def _order(self) -> dict[str, Any]:
        """What fixes the order of the training batches."""
        world_size = self.trainer.world_size if self.trainer else 1
        rows = len(self.train_data) if self.train_data is not None else None
        return {
            "rows": rows,
            "batch_size": self.batch_size,
            "world_size": world_size,
            "shuffle": self.shuffle,
            "seed": self.seed,
        }

    def state_dict(self) -> dict[str, Any]:
        """What fixed the batch order of this run, so a resumed run can warn when its order differs."""
        return {"order": self._order()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._resumed_order = state_dict["order"]

    def teardown(self, stage: str) -> None:
        if stage == "fit":
            self._resumed_order = None  # a later fit with this object is compared only with its own checkpoint
