"""PromptDataModule, its sources and built-in tasks: loading, rendering, errors, and exact resume."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from PIL import Image

from relax_pl.data import TASKS, DataError, PromptDataModule, ResumableSampler, arithmetic, load_rows
from relax_pl.data.sources import is_hub_id
from relax_pl.errors import RecipeError
from relax_pl.data.tasks import evaluate, split_of


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def samples(dm: PromptDataModule, split: str = "train") -> list[dict]:
    data = dm.train_data if split == "train" else dm.val_data
    return [data[i] for i in range(len(data))]


@pytest.fixture
def datasets_cache(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    return datasets


# ---------------------------------------------------------------- JSONL, keys, templates


def test_jsonl_custom_keys_and_other_columns(tmp_path):
    path = write_jsonl(
        tmp_path / "qa.jsonl",
        [
            {"question": "2+2?", "solution": 4, "id": "a"},
            {"question": "Capital of France?", "solution": "Paris", "id": "b"},
        ],
    )
    dm = PromptDataModule(str(path), prompt_key="question", answer_key="solution", shuffle=False, batch_size=2)
    dm.setup("fit")
    first, second = samples(dm)
    assert first == {
        "id": "a",
        "prompt": "2+2?",
        "messages": [{"role": "user", "content": "2+2?"}],
        "answer": "4",  # numbers become strings
        "images": None,
        "source": str(path),
        "row": 0,
    }
    assert second["answer"] == "Paris" and second["row"] == 1 and second["id"] == "b"
    assert "question" not in first and "solution" not in first
    batch = next(iter(dm.train_dataloader()))
    assert isinstance(batch, list) and [s["row"] for s in batch] == [0, 1]


def test_template_and_system_prompt(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"problem": "1+1", "answer": "2", "topic": "sums"}])
    dm = PromptDataModule(
        str(path),
        system_prompt="Answer in \\boxed{}.",
        prompt_template="[{topic}] Solve {prompt}; put it in \\boxed{{}}.",
        batch_size=1,
    )
    dm.setup("fit")
    sample = dm.train_data[0]
    assert sample["prompt"] == "[sums] Solve 1+1; put it in \\boxed{}."
    assert sample["messages"] == [
        {"role": "system", "content": "Answer in \\boxed{}."},
        {"role": "user", "content": "[sums] Solve 1+1; put it in \\boxed{}."},
    ]
    assert sample["topic"] == "sums"


@pytest.mark.parametrize(
    ("template", "match"),
    [("{prompt", "not a valid format string"), ("Q: {}", "positional field"), ("{0}", "positional field")],
)
def test_bad_template_fails_at_init(template, match):
    with pytest.raises(ValueError, match=match):
        PromptDataModule("builtin:arithmetic", prompt_template=template)


def test_template_field_missing_from_a_row(tmp_path):
    rows = [{"problem": "a", "answer": "1", "topic": "x"}, {"problem": "b", "answer": "2"}]
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    dm = PromptDataModule(str(path), prompt_template="{topic}: {prompt}")
    with pytest.raises(DataError, match=r"t\.jsonl row 1 \(line 2\).*'topic'"):
        dm.setup("fit")


# ---------------------------------------------------------------- errors naming file, row, field


def test_missing_prompt_field_names_file_row_and_field(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"problem": "ok", "answer": "1"}, "", {"answer": "2", "other": 1}])
    dm = PromptDataModule(str(path))
    with pytest.raises(DataError) as error:
        dm.setup("fit")
    message = str(error.value)
    assert str(path) in message and "row 1 (line 3)" in message and "'problem'" in message
    assert "['answer', 'other']" in message


def test_missing_answer_and_non_string_prompt(tmp_path):
    no_answer = write_jsonl(tmp_path / "a.jsonl", [{"problem": "x"}])
    with pytest.raises(DataError, match=r"a\.jsonl row 0 \(line 1\): missing answer field 'answer'"):
        PromptDataModule(str(no_answer)).setup("fit")
    number_prompt = write_jsonl(tmp_path / "b.jsonl", [{"problem": "x", "answer": 1}, {"problem": 7, "answer": 1}])
    with pytest.raises(DataError, match=r"b\.jsonl row 1 \(line 2\): prompt field 'problem' must be a string, got int"):
        PromptDataModule(str(number_prompt)).setup("fit")
    list_answer = write_jsonl(tmp_path / "c.jsonl", [{"problem": "x", "answer": [1]}])
    with pytest.raises(DataError, match="answer field 'answer' must be a string or a number, got list"):
        PromptDataModule(str(list_answer)).setup("fit")


def test_bad_json_line_names_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "broken.jsonl", [{"problem": "a", "answer": "1"}, '{"problem": "b", "answer": '])
    with pytest.raises(DataError, match=r"broken\.jsonl: line 2 is not valid JSON"):
        PromptDataModule(str(path)).setup("fit")
    path = write_jsonl(tmp_path / "array.jsonl", ["[1, 2]"])
    with pytest.raises(DataError, match=r"array\.jsonl: line 1 is a JSON list, expected an object"):
        load_rows(str(path), "train")


def test_non_utf8_bytes_name_the_file_and_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"problem": "a", "answer": "1"}\n{"problem": "caf\xe9", "answer": "2"}\n')
    with pytest.raises(DataError, match=rf"^{path}: line 2 is not UTF-8 \(byte b'\\xe9' at column 17\); save the"):
        PromptDataModule(str(path)).setup("fit")


def test_lone_surrogate_is_refused_when_the_data_loads(tmp_path):
    """``"\\ud800"`` is valid JSON but no text: the tokenizer failed on it mid-run, at that row's batch (and again
    after every resume). It is refused at setup, naming file, row, line and field."""
    rows = [{"problem": "a", "answer": "1"}, '{"problem": "x\\ud800y", "answer": "2"}']
    path = write_jsonl(tmp_path / "s.jsonl", rows)
    surrogate = r"s\.jsonl row 1 \(line 2\): field 'problem' holds a lone surrogate '\\ud800' at character 1"
    with pytest.raises(DataError, match=surrogate):
        PromptDataModule(str(path)).setup("fit")
    pair = write_jsonl(tmp_path / "pair.jsonl", ['{"problem": "\\ud83d\\ude00", "answer": "\\ud83d\\ude00"}'])
    dm = PromptDataModule(str(pair), batch_size=1)
    dm.setup("fit")
    assert samples(dm)[0]["prompt"] == "\U0001F600"  # a whole pair is one character


def test_missing_file_and_folder_split(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(RecipeError, match=rf"^data.train_source='{missing}': no such file or folder"):
        PromptDataModule(str(missing))  # when the recipe is read, naming the key
    with pytest.raises(RecipeError, match=r"^data.val_source='./nope/val.jsonl': no such file or folder"):
        PromptDataModule("builtin:arithmetic", val_source="./nope/val.jsonl")
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        load_rows("./not/here", "train")
    write_jsonl(tmp_path / "train.jsonl", [{"problem": "a", "answer": "1"}])
    with pytest.raises(FileNotFoundError, match=r"has no split 'test': expected test\.jsonl"):
        load_rows(str(tmp_path), "test")


def test_hub_ids_go_to_datasets_load_dataset(monkeypatch, datasets_cache):
    assert is_hub_id("hiyouga/geometry3k") and not is_hub_id("./geometry3k") and not is_hub_id("builtin:arithmetic")
    calls = []

    def fake_load_dataset(path, split):
        calls.append((path, split))
        if path == "someone/missing":
            raise ConnectionError("hub unreachable")
        return datasets_cache.Dataset.from_dict({"problem": ["p"], "answer": ["a"]})

    monkeypatch.setattr(datasets_cache, "load_dataset", fake_load_dataset)
    rows = load_rows("someone/data", "validation")
    assert calls == [("someone/data", "validation")] and rows[0] == {"problem": "p", "answer": "a"}
    with pytest.raises(DataError, match="'someone/missing' is not a local file or folder.*ConnectionError: hub"):
        load_rows("someone/missing", "train")


def test_hub_id_without_datasets_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ImportError, match="`pip install datasets` is needed to load the Hugging Face hub dataset"):
        load_rows("someone/data", "train")


def test_builtin_errors():
    with pytest.raises(DataError, match=r"unknown built-in task 'builtin:nope'; registered tasks: \['arithmetic'"):
        load_rows("builtin:nope", "train")
    with pytest.raises(DataError, match=r"task_options \['digit'\] are not options of 'builtin:arithmetic'"):
        load_rows("builtin:arithmetic", "train", {"digit": 2})
    with pytest.raises(ValueError, match="has no split 'dev'"):
        arithmetic("dev")
    with pytest.raises(ValueError, match="operations must be made of"):
        arithmetic("train", operations="+/")
    with pytest.raises(ValueError, match="num_operands must be >= 2"):
        arithmetic("train", num_operands=1)
    with pytest.raises(DataError, match="fewer than batch_size=8"):
        dm = PromptDataModule("builtin:arithmetic", batch_size=8, task_options={"num_samples": 5})
        dm.setup("fit")
        dm.train_dataloader()


# ---------------------------------------------------------------- folders, parquet, images


def make_image(path: Path, value: int) -> Path:
    Image.fromarray(np.full((4, 6, 3), value, dtype=np.uint8)).save(path)
    return path


def test_jsonl_folder_with_relative_image_paths(tmp_path):
    (tmp_path / "img").mkdir()
    make_image(tmp_path / "img" / "a.png", 10)
    make_image(tmp_path / "img" / "b.png", 20)
    write_jsonl(
        tmp_path / "train.jsonl",
        [{"problem": "<image><image> A?", "answer": "1", "images": ["img/a.png", "img/b.png"]}],
    )
    write_jsonl(tmp_path / "test.jsonl", [{"problem": "<image> B?", "answer": "2", "images": "img/b.png"}])
    dm = PromptDataModule(str(tmp_path), val_source=str(tmp_path), image_key="images", batch_size=1)
    dm.setup("fit")
    train, val = dm.train_data[0], dm.val_data[0]
    assert [image.size for image in train["images"]] == [(6, 4), (6, 4)]
    assert np.asarray(train["images"][1])[0, 0, 0] == 20
    assert len(val["images"]) == 1 and val["source"] == str(tmp_path) and val["prompt"] == "<image> B?"

    write_jsonl(tmp_path / "train.jsonl", [{"problem": "A?", "answer": "1", "images": "img/missing.png"}])
    with pytest.raises(DataError, match=r"train\.jsonl split 'train' row 0 \(line 1\): image file .*missing\.png"):
        PromptDataModule(str(tmp_path), image_key="images").setup("fit")
    write_jsonl(tmp_path / "train.jsonl", [{"problem": "A?", "answer": "1", "images": []}])
    with pytest.raises(DataError, match="row 0 .*missing image field 'images'"):
        PromptDataModule(str(tmp_path), image_key="images").setup("fit")


def image_dataset(datasets, problems: list, images: list):
    features = datasets.Features(
        {
            "problem": datasets.Value("string"),
            "answer": datasets.Value("string"),
            "images": datasets.List(datasets.Image()),
        }
    )
    answers = [str(i) for i in range(len(problems))]
    return datasets.Dataset.from_dict({"problem": problems, "answer": answers, "images": images}, features=features)


def test_parquet_snapshot_folder_with_images(tmp_path, datasets_cache):
    picture = Image.fromarray(np.full((5, 7, 3), 99, dtype=np.uint8))
    (tmp_path / "snap" / "data").mkdir(parents=True)
    ds = image_dataset(datasets_cache, ["<image>one", "<image>two", "<image>three"], [[picture], [picture], [picture]])
    ds.to_parquet(str(tmp_path / "snap" / "data" / "train-00000-of-00001.parquet"))
    dm = PromptDataModule(str(tmp_path / "snap"), image_key="images", max_train_samples=2, batch_size=2, shuffle=False)
    dm.setup("fit")
    assert len(dm.train_data) == 2
    batch = next(iter(dm.train_dataloader()))
    assert [s["prompt"] for s in batch] == ["<image>one", "<image>two"] and [s["answer"] for s in batch] == ["0", "1"]
    assert batch[1]["images"][0].size == (7, 5) and np.asarray(batch[1]["images"][0])[0, 0, 0] == 99

    bad = image_dataset(datasets_cache, ["ok", "no image"], [[picture], []])
    bad.to_parquet(str(tmp_path / "snap" / "data" / "train-00000-of-00001.parquet"))
    with pytest.raises(DataError, match=r"snap split 'train' row 1: missing image field 'images'"):
        PromptDataModule(str(tmp_path / "snap"), image_key="images").setup("fit")


def test_save_to_disk_folder(tmp_path, datasets_cache):
    picture = Image.fromarray(np.zeros((2, 2, 3), dtype=np.uint8))
    splits = datasets_cache.DatasetDict(
        {
            "train": image_dataset(datasets_cache, ["a", "b"], [[picture]] * 2),
            "test": image_dataset(datasets_cache, [None], [[picture]]),
        }
    )
    splits.save_to_disk(str(tmp_path / "saved"))
    dm = PromptDataModule(str(tmp_path / "saved"), batch_size=1)
    dm.setup("fit")
    assert dm.train_data[1]["prompt"] == "b" and dm.train_data[1]["answer"] == "1"
    assert dm.train_data[1]["images"] is None  # without image_key a run is text-only, whatever the columns
    with pytest.raises(DataError, match=r"saved split 'test' row 0: missing prompt field 'problem'"):
        PromptDataModule(str(tmp_path / "saved"), val_source=str(tmp_path / "saved")).setup("validate")
    with pytest.raises(DataError, match=r"has no split 'validation'; it has \['test', 'train'\]"):
        load_rows(str(tmp_path / "saved"), "validation")


# ---------------------------------------------------------------- built-in arithmetic


def test_arithmetic_is_deterministic_exact_and_split_disjoint():
    first = arithmetic("train", num_samples=200, digits=2, operations="+-*", num_operands=3, seed=7)
    assert first == arithmetic("train", num_samples=200, digits=2, operations="+-*", num_operands=3, seed=7)
    assert first != arithmetic("train", num_samples=200, digits=2, operations="+-*", num_operands=3, seed=8)
    for row in first:
        expression = row["problem"].removeprefix("What is ").removesuffix("?")
        assert row["answer"] == str(eval(expression))  # Python's precedence is the one the prompt implies
    assert evaluate([2, 3, 4], ["-", "*"]) == -10
    assert arithmetic("train", num_samples=1)[0] == {"problem": "What is 8 + 3?", "answer": "11"}
    train = {row["problem"] for row in arithmetic("train", num_samples=500)}
    test = {row["problem"] for row in arithmetic("test", num_samples=50)}
    assert train.isdisjoint(test) and len(test) > 3
    assert all(split_of(problem) == "test" for problem in test)


def test_arithmetic_difficulty_knobs():
    def operands(row):
        return [token for token in row["problem"].removeprefix("What is ").removesuffix("?").split() if token.isdigit()]

    easy = arithmetic("train", num_samples=100, digits=1, operations="+")
    hard = arithmetic("train", num_samples=100, digits=3, operations="*-", num_operands=4)
    assert all(len(operands(row)) == 2 and all(len(x) == 1 for x in operands(row)) for row in easy)
    assert all(" + " in row["problem"] for row in easy)
    assert all(len(operands(row)) == 4 and all(len(x) == 3 for x in operands(row)) for row in hard)
    assert all(" + " not in row["problem"] for row in hard)
    assert any(" * " in row["problem"] for row in hard) and any(" - " in row["problem"] for row in hard)
    assert max(abs(int(row["answer"])) for row in hard) > 10**6 > max(int(row["answer"]) for row in easy)


def test_builtin_source_fields_and_val_split():
    dm = PromptDataModule(
        "builtin:arithmetic",
        val_source="builtin:arithmetic",
        task_options={"num_samples": 12, "digits": 2},
        max_val_samples=5,
        val_batch_size=4,
        batch_size=3,
    )
    dm.setup("fit")
    assert len(dm.train_data) == 12 and len(dm.val_data) == 5
    assert {s["source"] for s in samples(dm)} == {"builtin:arithmetic"}
    assert [s["row"] for s in samples(dm, "val")] == [0, 1, 2, 3, 4]
    assert {s["prompt"] for s in samples(dm)}.isdisjoint({s["prompt"] for s in samples(dm, "val")})
    val_batches = list(dm.val_dataloader())
    assert [[s["row"] for s in b] for b in val_batches] == [[0, 1, 2, 3], [4]]
    assert len(dm.train_dataloader()) == 4
    assert PromptDataModule("builtin:arithmetic").val_dataloader() == []
    assert "arithmetic" in TASKS


# ---------------------------------------------------------------- ordering and exact resume


def test_sampler_shards_ranks_and_reshuffles_epochs():
    data = list(range(10))
    epoch_of = {}

    def order(rank, position):
        sampler = ResumableSampler(data, batch_size=2, position=lambda: position, num_replicas=2, rank=rank, seed=3)
        indices = list(sampler)
        epoch_of[rank, position] = sampler.epoch
        return indices

    assert len(order(0, 0)) == 4  # 5 rows per rank: two full batches of 2
    assert set(order(0, 0)).isdisjoint(order(1, 0))
    assert order(0, 0) != order(0, 2)[:4] and epoch_of[0, 2] == 1
    assert order(0, 1) == order(0, 0)[2:]  # one batch trained: the epoch goes on from its second batch
    assert order(0, 3) == order(0, 2)[2:]


class RowRecorder(L.LightningModule):
    """Records the rows of each training batch; manual optimisation like RLVRModule."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[list[int]] = []

    def training_step(self, batch, batch_idx):
        self.seen.append([sample["row"] for sample in batch])
        optimizer = self.optimizers()
        optimizer.zero_grad()
        self.manual_backward((self.weight - 1).pow(2).sum())
        optimizer.step()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit_rows(root: Path, max_steps: int, ckpt_path: str | None = None, seed: int = 0) -> list[list[int]]:
    """Rows trained on by a fit over 10 prompts, 3 per step (3 steps per epoch); writes last.ckpt in root."""
    module = RowRecorder()
    data = PromptDataModule("builtin:arithmetic", batch_size=3, seed=seed, task_options={"num_samples": 10})
    checkpoint = ModelCheckpoint(dirpath=root, save_last=True, every_n_train_steps=1, save_top_k=0)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[checkpoint],
        default_root_dir=root,
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(resumable|num_workers|does not have many workers).*")
        trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return module.seen


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    return fit_rows(tmp_path_factory.mktemp("full"), max_steps=8)


@pytest.mark.parametrize("k", [2, 3, 4])  # mid-epoch, at the end of epoch 0, in epoch 1
def test_resume_trains_on_the_same_batches(tmp_path, uninterrupted, k):
    assert len(uninterrupted) == 8 and uninterrupted[:3] != uninterrupted[3:6]  # spans 3 epochs, reshuffled
    assert all(len(set(sum(uninterrupted[i : i + 3], []))) == 9 for i in (0, 3))  # 3 full batches of distinct rows
    before = fit_rows(tmp_path / "a", max_steps=k)
    after = fit_rows(tmp_path / "b", max_steps=8, ckpt_path=str(tmp_path / "a" / "last.ckpt"))
    assert before == uninterrupted[:k]
    assert after == uninterrupted[k:]


def test_resume_from_checkpoint_written_at_train_end(tmp_path, uninterrupted):
    # Lightning numbers epochs differently after this checkpoint (it counts the cut epoch as finished)
    root = tmp_path / "a"
    module, data = RowRecorder(), PromptDataModule("builtin:arithmetic", batch_size=3, task_options={"num_samples": 10})
    trainer = L.Trainer(
        accelerator="cpu", max_steps=2, logger=False, enable_progress_bar=False, enable_checkpointing=False
    )
    trainer.fit(module, datamodule=data)
    trainer.save_checkpoint(root / "end.ckpt")
    after = fit_rows(tmp_path / "b", max_steps=8, ckpt_path=str(root / "end.ckpt"))
    assert module.seen + after == uninterrupted


def test_resume_with_a_different_order_warns(tmp_path):
    fit_rows(tmp_path / "a", max_steps=2)
    with pytest.warns(UserWarning, match="resumes a run whose prompt order came from"):
        fit_rows(tmp_path / "b", max_steps=3, ckpt_path=str(tmp_path / "a" / "last.ckpt"), seed=1)


class ValidationRecorder(RowRecorder):
    def __init__(self) -> None:
        super().__init__()
        self.val_seen: list[list[int]] = []

    def validation_step(self, batch, batch_idx):
        self.val_seen.append([sample["row"] for sample in batch])


@pytest.mark.parametrize("val_source", [None, "builtin:arithmetic"])
def test_fit_validates_only_with_a_val_source(tmp_path, val_source):
    module = ValidationRecorder()
    data = PromptDataModule(
        "builtin:arithmetic",
        val_source=val_source,
        batch_size=2,
        val_batch_size=3,
        max_val_samples=4,
        task_options={"num_samples": 4},
    )
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=1,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, datamodule=data)
    assert len(module.seen) == 2
    assert module.val_seen == ([] if val_source is None else [[0, 1, 2], [3]])
