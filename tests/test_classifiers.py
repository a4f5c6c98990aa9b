"""Tests for classifier unlearning: metrics, data handling, methods, the benchmark (benchmarks/classifier.py) and
its command line."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from benchmarks._common import write_results
from benchmarks.classifier import (
    DEFAULT_UNLEARN_LR,
    BenchmarkConfig,
    ClassifierCommand,
    main,
    results_markdown,
    run_benchmark,
    sweep_markdown,
    sweep_unlearn_lr,
)
from munba_diffusion.classifiers.data import (
    ForgetSpec,
    classification_data_from_splits,
    load_classification_data,
    parse_forget_spec,
    split_forget,
)
from munba_diffusion.classifiers.metrics import (
    UnlearningMetrics,
    accuracy,
    average_gap,
    evaluate_unlearning,
    mia_efficacy,
)
from munba_diffusion.classifiers.models import build_model
from munba_diffusion.classifiers.unlearn import TrainConfig, UnlearnConfig, train_classifier, unlearn
from munba_diffusion.config import parse_config
from munba_diffusion.step import NonFiniteGradientError


class LookupModel(nn.Module):
    """Returns a fixed row of logits per sample; the 'image' holds the sample's row index."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.logits[images.flatten().long()]


def test_accuracy_and_gap_on_constructed_inputs() -> None:
    probabilities = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
    assert accuracy(probabilities, torch.tensor([0, 1, 1, 1])) == 75.0
    ours = UnlearningMetrics(UA=10.0, RA=90.0, TA=80.0, MIA=30.0)
    retrain = UnlearningMetrics(UA=5.0, RA=100.0, TA=85.0, MIA=10.0)
    assert average_gap(ours, retrain) == pytest.approx((5 + 10 + 5 + 20) / 4)


def test_ua_ra_ta_definitions() -> None:
    # 6 training samples (forget = 0, 1, 2; retain = 3, 4, 5) and 4 test samples, 3 classes
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    test_labels = torch.tensor([0, 1, 2, 0])
    predicted_train = torch.tensor([0, 0, 0, 0, 1, 0])  # forget: 1 of 3 right; retain: 2 of 3 right
    predicted_test = torch.tensor([0, 1, 1, 1])  # 2 of 4 right
    logits = 10.0 * nn.functional.one_hot(torch.cat([predicted_train, predicted_test]), 3).float()
    model = LookupModel(logits)
    metrics = evaluate_unlearning(
        model,
        torch.arange(6.0)[:, None, None, None],
        labels,
        torch.arange(6.0, 10.0)[:, None, None, None],
        test_labels,
        torch.tensor([0, 1, 2]),
        torch.tensor([3, 4, 5]),
        torch.Generator().manual_seed(0),
    )
    assert metrics.UA == pytest.approx(100 - 100 / 3)
    assert metrics.RA == pytest.approx(200 / 3)
    assert metrics.TA == pytest.approx(50.0)
    assert 0.0 <= metrics.MIA <= 100.0


def test_mia_efficacy_on_a_synthetic_attack() -> None:
    rng = np.random.default_rng(0)
    members = rng.uniform(0.9, 1.0, 200)  # the model is confident on its training data
    non_members = rng.uniform(0.2, 0.6, 200)
    assert mia_efficacy(members, non_members, rng.uniform(0.92, 1.0, 50)) == 0.0  # remembered: all "members"
    assert mia_efficacy(members, non_members, rng.uniform(0.25, 0.55, 50)) == 100.0  # forgotten
    mixed = np.concatenate([rng.uniform(0.92, 1.0, 30), rng.uniform(0.25, 0.55, 10)])
    assert mia_efficacy(members, non_members, mixed) == pytest.approx(25.0)


def test_forget_specs_and_split() -> None:
    assert parse_forget_spec("random:0.1") == ForgetSpec("random", 0.1)
    assert parse_forget_spec("class:3") == ForgetSpec("class", 3)
    for bad, message in [
        ("random:0", r"\(0, 1\)"),
        ("random:1.0", r"\(0, 1\)"),
        ("random:-0.2", r"\(0, 1\)"),
        ("random:x", "cannot read"),
        ("class:two", "cannot read"),
        ("subset:0.1", "unknown forget spec"),
    ]:
        with pytest.raises(ValueError, match=message) as error:
            parse_forget_spec(bad)
        assert "\n" not in str(error.value)
    labels = torch.tensor([0, 1, 2, 3] * 25)
    forget, retain = split_forget(labels, ForgetSpec("random", 0.1), 4, torch.Generator().manual_seed(0))
    assert len(forget) == 10 and len(retain) == 90 and set(forget.tolist()).isdisjoint(retain.tolist())
    forget, retain = split_forget(labels, ForgetSpec("class", 2), 4, torch.Generator().manual_seed(0))
    assert (labels[forget] == 2).all() and (labels[retain] != 2).all() and len(forget) + len(retain) == 100
    with pytest.raises(ValueError, match=r"classes 0\.\.3"):
        split_forget(labels, ForgetSpec("class", 4), 4, torch.Generator())


def test_image_dataset_conversion_detects_columns() -> None:
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Image
    from PIL import Image as PILImage

    rng = np.random.default_rng(0)
    images = [PILImage.fromarray(rng.integers(0, 255, (10, 12, 3), dtype=np.uint8)) for _ in range(12)]
    features = Features({"picture_id": Image(), "fine_label": ClassLabel(names=["a", "b", "c"])})
    dataset = Dataset.from_dict({"picture_id": images, "fine_label": [0, 1, 2] * 4}, features=features)
    data = classification_data_from_splits(DatasetDict({"train": dataset}), "local", image_size=8, test_fraction=0.25)
    assert data.train_images.shape == (9, 3, 8, 8) and data.test_images.shape == (3, 3, 8, 8)
    assert data.num_classes == 3 and sorted(data.test_labels.tolist()) == [0, 1, 2]
    assert data.train_images.mean().abs() < 1e-5  # normalised with training statistics
    with pytest.raises(ValueError, match="image and label columns"):
        classification_data_from_splits(DatasetDict({"train": Dataset.from_dict({"x": [1, 2]})}), "bad")


def test_resnet18_variant_builds_for_small_grey_images() -> None:
    model = build_model("resnet18", num_classes=7, in_channels=1)
    assert model(torch.randn(2, 1, 16, 16)).shape == (2, 7)
    with pytest.raises(ValueError, match="small-resnet, resnet18"):
        build_model("vgg", 10, 3)


@pytest.fixture(scope="module")
def tiny_setup():
    torch.set_num_threads(1)
    data = load_classification_data("digits", image_size=8, max_train_samples=600)
    torch.manual_seed(0)
    model = build_model("small-resnet", data.num_classes, data.in_channels)
    everything = torch.arange(len(data.train_labels))
    train_classifier(
        model,
        data.train_images,
        data.train_labels,
        everything,
        TrainConfig(epochs=8, lr=0.05),
        torch.Generator().manual_seed(0),
    )
    forget, retain = split_forget(data.train_labels, ForgetSpec("class", 3), 10, torch.Generator().manual_seed(0))
    return data, model, forget, retain


def _metrics(model, data, forget, retain) -> UnlearningMetrics:
    return evaluate_unlearning(
        model,
        data.train_images,
        data.train_labels,
        data.test_images,
        data.test_labels,
        forget,
        retain,
        torch.Generator().manual_seed(0),
    )


def test_munba_forgets_a_class_and_keeps_the_rest(tiny_setup) -> None:
    data, original, forget, retain = tiny_setup
    before = _metrics(original, data, forget, retain)
    assert before.UA < 10 and before.RA > 90  # the original model knows the class
    config = UnlearnConfig("munba", epochs=2, lr=0.05, combiner="nash")
    unlearned, record = unlearn(
        original, data.train_images, data.train_labels, forget, retain, 10, config, torch.Generator().manual_seed(0)
    )
    assert record["skipped_steps"] == 0 and record["steps"] > 0
    after = _metrics(unlearned, data, forget, retain)
    assert after.UA > 80  # forget accuracy falls below 20 %
    assert after.RA > before.RA - 5
    assert _metrics(original, data, forget, retain) == before  # unlearning works on a copy


def test_munba_with_sum_combiner_is_random_labelling(tiny_setup) -> None:
    data, original, forget, retain = tiny_setup
    models = [
        unlearn(
            original,
            data.train_images,
            data.train_labels,
            forget,
            retain,
            10,
            UnlearnConfig(method, epochs=1, lr=0.01, combiner="sum"),
            torch.Generator().manual_seed(0),
        )[0]
        for method in ("rl", "munba")
    ]
    for p, q in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)
    nash = unlearn(
        original,
        data.train_images,
        data.train_labels,
        forget,
        retain,
        10,
        UnlearnConfig("munba", epochs=1, lr=0.01),
        torch.Generator().manual_seed(0),
    )[0]
    assert any(not torch.allclose(p, q) for p, q in zip(nash.parameters(), models[0].parameters()))


def _forget_images_are_nan() -> tuple[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A linear classifier whose forget images are NaN: the forget loss (and its gradient) is NaN."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    images, labels = torch.randn(12, 1, 2, 2), torch.arange(12) % 3
    forget, retain = torch.arange(4), torch.arange(4, 12)
    images[forget] = float("nan")
    return model, images, labels, forget, retain


@pytest.mark.parametrize(
    ("method", "player"), [("munba", "forget"), ("rl", "CE(retain)+CE(forget, random labels)"), ("ga", "-CE(forget)")]
)
def test_unlearning_follows_the_nonfinite_policy(method, player) -> None:
    model, images, labels, forget, retain = _forget_images_are_nan()
    config = UnlearnConfig(method, epochs=2, batch_size=4)
    with pytest.raises(NonFiniteGradientError) as error:
        unlearn(model, images, labels, forget, retain, 3, config, torch.Generator().manual_seed(0))
    assert error.value.players == [player]

    skipped, record = unlearn(
        model,
        images,
        labels,
        forget,
        retain,
        3,
        dataclasses.replace(config, nonfinite_gradients="skip"),
        torch.Generator().manual_seed(0),
    )
    assert record["skipped_steps"] == record["steps"] > 0
    assert all(torch.equal(p, q) for p, q in zip(skipped.parameters(), model.parameters()))
    _, fine_tuned = unlearn(
        model,
        images,
        labels,
        forget,
        retain,
        3,
        dataclasses.replace(config, method="ft"),
        torch.Generator().manual_seed(0),
    )
    assert fine_tuned["skipped_steps"] == 0  # ft never sees the forget images


BAD_OPTIONS = {
    UnlearnConfig: [
        ("method", "salun"),
        ("epochs", 0),
        ("epochs", 1.5),
        ("lr", 0.0),
        ("lr", float("inf")),
        ("batch_size", 0),
        ("momentum", 1.0),
        ("momentum", -0.1),
        ("weight_decay", -1e-4),
        ("combiner", "median"),
        ("max_grad_norm", 0.0),
        ("max_grad_norm", -1.0),
        ("nonfinite_gradients", "ignore"),
    ],
    TrainConfig: [
        ("epochs", 0),
        ("lr", -0.1),
        ("batch_size", 0),
        ("momentum", 1.0),
        ("weight_decay", -1.0),
    ],
}


@pytest.mark.parametrize(
    ("config_class", "field", "value"),
    [(cls, field, value) for cls, options in BAD_OPTIONS.items() for field, value in options],
)
def test_every_config_rule_is_a_one_line_error_naming_the_field(config_class, field, value) -> None:
    valid = {"method": "munba"} if config_class is UnlearnConfig else {}
    with pytest.raises(ValueError) as error:
        config_class(**{**valid, field: value})
    message = str(error.value)
    assert message.startswith(f"{field} (--{field})") and repr(value) in message and "\n" not in message


@pytest.mark.parametrize("config_class", list(BAD_OPTIONS))
def test_every_config_field_has_a_rule_tested(config_class) -> None:
    assert {f.name for f in dataclasses.fields(config_class)} == {field for field, _ in BAD_OPTIONS[config_class]}


def test_benchmark_end_to_end_writes_reports(tmp_path) -> None:
    config = BenchmarkConfig(
        image_size=8,
        seeds=(0,),
        forget=("class:1",),
        methods=("retrain", "ft", "munba"),
        epochs=2,
        unlearn_epochs=1,
        max_train_samples=300,
        max_test_samples=100,
    )
    results = run_benchmark(config, progress=False)
    assert [r["method"] for r in results["runs"]] == ["original", "retrain", "ft", "munba"]
    retrain = next(r for r in results["runs"] if r["method"] == "retrain")
    assert retrain["avg_gap"] == 0.0 and retrain["UA"] == 100.0  # never saw the class
    paths = write_results(tmp_path, results, results_markdown)
    saved = json.loads(paths[0].read_text())
    assert saved["summary"]["class:1"]["munba"]["UA"]["n"] == 1
    assert saved["machine"]["nproc"] >= 1 and saved["runs"][-1]["skipped_steps"] == 0
    markdown = paths[1].read_text()
    assert "| munba |" in markdown and "Avg. Gap" in markdown and "seeds: 0" in markdown
    with pytest.raises(FileExistsError, match="--overwrite"):
        write_results(tmp_path, results, results_markdown)
    write_results(tmp_path, replace_protocol(results), results_markdown, overwrite=True)
    assert json.loads(paths[0].read_text())["protocol"]["dataset"] == "changed"


def replace_protocol(results: dict) -> dict:
    return {**results, "protocol": {**results["protocol"], "dataset": "changed"}}


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--methods", "retrain", "salun"], "methods (--methods) must be one of retrain, ft, ga, rl, munba"),
        (["--forget", "random:1.5"], "forget fraction must be in (0, 1)"),
        (["--forget", "class:10"], "forget class 10 is out of range"),
        (["--combiner", "nope"], "combiner (--combiner) must be one of nash"),
        (["--unlearn-lr", "munba=-1"], "--unlearn_lr expects"),
        (["--lr_grid", "0.1", "0"], "lr_grid (--lr_grid) must be > 0"),
    ],
)
def test_cli_bad_input_is_a_one_line_error(arguments, message, tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--output-dir", str(tmp_path / "out"), "--quiet", *arguments])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]  # after argparse's usage line, if any
    assert error.startswith("munba-unlearn-classifier: error:") and message in error
    assert not (tmp_path / "out").exists()


def test_cli_refuses_to_overwrite_results(tmp_path, capsys) -> None:
    (tmp_path / "results.json").write_text("{}")
    with pytest.raises(SystemExit):
        main(["--output-dir", str(tmp_path), "--quiet"])
    assert "--overwrite" in capsys.readouterr().err
    assert (tmp_path / "results.json").read_text() == "{}"


def test_learning_rate_sweep_picks_the_lowest_gap(tmp_path) -> None:
    config = BenchmarkConfig(
        image_size=8,
        seeds=(5,),
        forget=("class:2",),
        methods=("ft", "munba"),
        epochs=2,
        unlearn_epochs=1,
        max_train_samples=300,
        max_test_samples=100,
    )
    sweep = sweep_unlearn_lr(config, [0.001, 0.1], progress=False)
    for method in ("ft", "munba"):
        gaps = sweep["mean_gap"]["class"][method]
        assert sweep["best_lr"]["class"][method] == (0.001 if gaps["0.001"] <= gaps["0.1"] else 0.1)
        runs = [r for r in sweep["runs"] if r["method"] == method]
        assert sorted(r["lr"] for r in runs) == [0.001, 0.1]
    json_path, md_path = write_results(tmp_path, sweep, sweep_markdown, stem="lr_sweep")
    assert json_path.name == "lr_sweep.json" and md_path.name == "lr_sweep.md"
    assert "| munba |" in md_path.read_text() and json.loads(json_path.read_text())["grid"] == [0.001, 0.1]


def test_cli_learning_rate_overrides_per_kind() -> None:
    config = parse_config(ClassifierCommand, ["--output-dir", "out", "--unlearn-lr", "class:munba=0.5", "ft=0.2"])
    rates = config.learning_rates
    assert rates["class"]["munba"] == 0.5
    assert rates["random"]["munba"] == DEFAULT_UNLEARN_LR["random"]["munba"] != 0.5
    assert rates["class"]["ft"] == rates["random"]["ft"] == 0.2
    assert DEFAULT_UNLEARN_LR["class"]["ft"] != 0.2  # defaults are not mutated
    assert config.unlearn_config("munba", "class").lr == 0.5
    assert config.train == TrainConfig() and config.output_dir == Path("out")
