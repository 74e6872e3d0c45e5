"""The measurement tools in tools/: a tiny real run of each, and their refusals.

Every tool runs as a user runs it (``python tools/<name>.py``, flags written
as in docs/benchmarks.md: ``--flag value``, comma lists), on a tiny
configuration, and its report must agree with itself: medians of the step
times it lists, ratios of its medians, counts that add up. Bad input must
end the tool with one line on stderr and exit status 2, leaving the output
paths as they were. ``tools/multiworker_benchmark.py`` starts three
TensorFlow processes per round (about 45 s of CPU even when tiny), so only
its refusals are tested here.
"""

import json
import re
import statistics
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from support import CONFIGS, REPO, environment, run_cli, snapshot, write_learnable_npz

TOOLS = REPO / "tools"
# A resnet18 too small to cost more than tracing: 8x8 images, 4 classes,
# batches of 8.
BATCH = 8
TINY_NETWORK = ("--width_multiplier", "0.0625", "--image_size", "8", "--num_classes", "4",
                "--num_train_examples", "64", "--batch_size", str(BATCH))


def run_tool(name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(TOOLS / name), *args], cwd=REPO, env=environment(),
        capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)


def assert_refused(result: subprocess.CompletedProcess, program: str, *fragments: str):
    """Exit status 2 and one line on stderr, ``<program>: error: ...`` naming the problem."""
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"{program}: error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def write_folder_dataset(root, train_per_class: int = 6, test_per_class: int = 2) -> str:
    """``folder:`` layout, two classes of random 8x8 PNGs; returns the dataset string."""
    rng = np.random.default_rng(0)
    for split, count in (("train", train_per_class), ("test", test_per_class)):
        for name in ("cat", "dog"):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return f"folder:{root}"


# -- benchmark.py -----------------------------------------------------------------


def test_benchmark_report_agrees_with_its_step_times(tmp_path):
    steps, rounds = 2, 2
    result = run_tool(
        "benchmark.py", *TINY_NETWORK, "--steps", str(steps),
        "--warmup", "1", "--rounds", str(rounds), "--xla", "none",
        "--combinations", "backbone,pskd+byot+dmfl,pipeline",
        "--out_json", str(tmp_path / "b.json"), "--out_md", str(tmp_path / "b.md"))
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.json", "b.md"]
    report = json.loads((tmp_path / "b.json").read_text())
    meta = report["meta"]
    assert (meta["width_multiplier"], meta["batch_size"], meta["steps"], meta["rounds"],
            meta["xla"], meta["image_size"], meta["num_train_examples"]) == (
        0.0625, BATCH, steps, rounds, "none", 8, 64)
    assert meta["combinations"] == ["backbone", "pskd+byot+dmfl", "pipeline"]
    results = {r["configuration"]: r for r in report["results"]}
    assert list(results) == meta["combinations"]
    assert [r["xla"] for r in results.values()] == [False, False, None]
    for r in results.values():
        times = r["step_times_s"]
        assert len(times) == r["timed_steps"] == steps * rounds
        assert all(t > 0 for t in times)
        assert r["step_time_s"] == statistics.median(times)
        assert (r["step_time_min_s"], r["step_time_max_s"]) == (min(times), max(times))
        assert r["images_per_s"] == pytest.approx(BATCH / r["step_time_s"], rel=1e-12)
        assert r["warmup_s"] > 0 and r["peak_memory_mb"] is not None
    ratio = results["pskd+byot+dmfl"]["step_time_s"] / results["backbone"]["step_time_s"]
    # No baseline was timed, so there is only the ratio to the backbone.
    assert report["ratios"] == {"no_xla": {"pskd+byot+dmfl/backbone": ratio}}

    table = (tmp_path / "b.md").read_text()
    assert table in result.stdout
    cells = [[cell.strip() for cell in line.strip().strip("|").split("|")]
             for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    rows = {row[0]: row for row in cells[1:]}  # after the heading
    assert cells[0][5:] == ["vs baseline", "vs backbone"]
    full = rows["pskd+byot+dmfl"]
    assert full[2] == f"{1000 * results['pskd+byot+dmfl']['step_time_s']:.1f}"
    assert full[5:] == ["", f"{ratio:.3f}x"]
    assert rows["backbone"][5:] == ["", "1.000x"]
    assert rows["pipeline"][1] == "n/a" and rows["pipeline"][5:] == ["", ""]
    assert f"Without XLA: pskd+byot+dmfl/backbone = {ratio:.3f}." in table


# Each case starts TensorFlow (seconds): one per kind of check.
@pytest.mark.parametrize("args, fragments", [
    (["--combinations", "baseline,pskd+byot+dmfl,basline"], ["--combinations", "'basline'"]),
], ids=["unknown-configuration"])
def test_benchmark_refuses_bad_input_before_any_work(tmp_path, args, fragments):
    (tmp_path / "file").write_text("not a directory")
    before = snapshot(tmp_path)
    args = [arg.format(file=tmp_path / "file") for arg in args]
    result = run_tool("benchmark.py", *TINY_NETWORK, "--out_json", str(tmp_path / "b.json"),
                      *args)
    assert_refused(result, "benchmark.py", *fragments)
    assert result.stdout == ""  # nothing was timed
    assert snapshot(tmp_path) == before


# -- multiworker_benchmark.py -------------------------------------------------------


@pytest.mark.parametrize("args, fragments", [
    # 4 synthetic batches of 32 need 128 distinct rows of the PS-KD table.
    (["--arch", "resnext50_32x4d", "--image_size", "12"],
     ["cannot build resnext50_32x4d", "multiples of 8"]),
], ids=["image-size-the-exit-heads-cannot-take"])
def test_multiworker_benchmark_refuses_bad_input_before_starting_workers(
        tmp_path, args, fragments):
    result = run_tool("multiworker_benchmark.py", *TINY_NETWORK,
                      "--out_json", str(tmp_path / "mw.json"), *args)
    assert_refused(result, "multiworker_benchmark.py", *fragments)
    assert list(tmp_path.iterdir()) == []


# -- pipeline_throughput.py -------------------------------------------------------


def test_pipeline_throughput_reads_whole_epochs(tmp_path):
    dataset = write_folder_dataset(tmp_path / "data")
    # The flag names of the tool's argparse days, hyphens and all.
    result = run_tool("pipeline_throughput.py", "--dataset", dataset, "--batch-size", "4",
                      "--epochs", "3", "--no-augment")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert f"loaded {dataset}: 12 training images" in out
    assert "of shape (8, 8, 3)" in out and "batch 4, augment=False" in out
    rates = dict(re.findall(r"^(warm-up|epoch \d+): ([\d,]+) images/s$", out, re.M))
    assert list(rates) == ["warm-up", "epoch 1", "epoch 2", "epoch 3"]
    # Over an odd number of epochs the median is one of them, printed alike.
    epochs = sorted(int(rates[f"epoch {i}"].replace(",", "")) for i in (1, 2, 3))
    median = re.search(r"^median over 3 epochs: ([\d,]+) images/s$", out, re.M).group(1)
    assert int(median.replace(",", "")) == epochs[1] > 0
    before, peak = re.search(r"before building the data: ([\d,]+) MB; peak: ([\d,]+) MB$",
                             out, re.M).groups()
    assert int(peak.replace(",", "")) >= int(before.replace(",", "")) > 0


def test_pipeline_throughput_refuses_an_image_that_does_not_decode(tmp_path):
    dataset = write_folder_dataset(tmp_path / "data")
    (tmp_path / "data" / "train" / "dog" / "broken.png").write_bytes(b"not a png")
    result = run_tool("pipeline_throughput.py", "--dataset", dataset)
    assert_refused(result, "pipeline_throughput.py", "--dataset", "broken.png")


def test_pipeline_throughput_writes_a_jpeg_folder(tmp_path):
    root = tmp_path / "jpegs"
    result = run_tool("pipeline_throughput.py", "--write_jpegs", str(root), "--jpegs", "20",
                      "--jpeg_size", "12")
    assert result.returncode == 0, result.stderr
    train = list(root.glob("train/class*/*.jpg"))
    assert len(train) == 20 and len(list(root.glob("test/class*/*.jpg"))) == 10
    assert Image.open(train[0]).size == (12, 12)


# -- table_memory.py -----------------------------------------------------------------


def test_table_memory_times_the_tables_work_per_step(tmp_path):
    report_path = tmp_path / "timing.json"
    result = run_tool("table_memory.py", "--time_steps", "2", "--batch_size", "4",
                      "--num_examples", "50", "--num_classes", "10", "--table_top_k", "2",
                      "--out_json", str(report_path))
    assert result.returncode == 0, result.stderr
    report = json.loads(report_path.read_text())
    assert {k: report[k] for k in ("num_examples", "num_classes", "table_top_k",
                                   "batch_size")} == {
        "num_examples": 50, "num_classes": 10, "table_top_k": 2, "batch_size": 4}
    assert report["step_ms"] > 0 and report["refresh_ms"] >= 0


# -- early_exit_study.py ------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A 2-exit run trained for one epoch on 64 images; 32 test images."""
    folder = tmp_path_factory.mktemp("early_exit_run")
    dataset = write_learnable_npz(folder / "data.npz", n_train=64, n_test=32)
    result = run_cli("selfkd_tf.cli.train", f"--flagfile={CONFIGS / 'smoke.flags'}",
                     f"--dataset={dataset}", f"--model_dir={folder / 'run'}", "--epochs=1",
                     "--train_examples=64", "--eval_examples=32")
    assert result.returncode == 0, result.stderr
    return folder / "run"


def test_early_exit_study_reports_on_the_half_it_did_not_select_on(trained_run, tmp_path):
    out = tmp_path / "study"
    # Any threshold keeps within 100 points, so the cheapest wins: 0, which
    # answers every image at exit 1.
    result = run_tool("early_exit_study.py", f"--model={trained_run}", f"--out={out}",
                      "--max_accuracy_drop=100", "--latency_examples=8", "--rounds=1")
    assert result.returncode == 0, result.stderr
    study = json.loads((out / "early_exit_study.json").read_text())
    assert json.loads(result.stdout) == study
    assert sorted(p.name for p in out.iterdir()) == ["cascade", "deepest",
                                                     "early_exit_study.json"]
    for name in ("cascade", "deepest"):
        assert (out / name / "saved_model.pb").is_file()
    assert study["selection_examples"] + study["report_examples"] == 32
    assert study["threshold"] == 0.0
    report = study["report"]
    exits, cascade = report["exits"], report["cascade"]
    assert [e["exit"] for e in exits] == [1, 2] and report["deepest"] == exits[-1]
    assert cascade["exit_fractions"] == [1.0, 0.0]
    assert cascade["accuracy"] == exits[0]["accuracy"]
    assert cascade["mean_flops"] == exits[0]["flops"] < exits[1]["flops"]
    assert cascade["flops_vs_deepest"] == pytest.approx(exits[0]["flops"] / exits[1]["flops"])
    # Accuracies are shares of the half they were measured on.
    for accuracy, examples in [(e["accuracy"], study["report_examples"]) for e in exits] + [
            (study["selection"]["cascade_accuracy"], study["selection_examples"])]:
        correct = accuracy / 100 * examples
        assert correct == pytest.approx(round(correct))
    assert study["latency_examples"] == 8
    assert {name: sorted(by_batch) for name, by_batch in study["latency_ms"].items()} == {
        "deepest": ["1", "8"], "cascade": ["1", "8"]}


def test_early_exit_study_refuses_a_missing_model_before_writing(tmp_path):
    result = run_tool("early_exit_study.py", f"--model={tmp_path / 'no_run'}",
                      f"--out={tmp_path / 'study'}")
    assert_refused(result, "early_exit_study.py", "--model", "no_run")
    assert list(tmp_path.iterdir()) == []


def test_early_exit_study_leaves_a_directory_of_other_files_alone(trained_run, tmp_path):
    (tmp_path / "deepest").mkdir()
    (tmp_path / "deepest" / "notes.txt").write_text("mine")
    before = snapshot(tmp_path)
    result = run_tool("early_exit_study.py", f"--model={trained_run}", f"--out={tmp_path}")
    assert_refused(result, "early_exit_study.py", "--out", "holding other files")
    assert snapshot(tmp_path) == before
