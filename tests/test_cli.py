"""The command line as a user meets it: bad input is one line and exit status 2; plans print and save."""

import json
from pathlib import Path

import click
import pytest

from tests.cli_run import remat

ROOT = Path(__file__).resolve().parent.parent

FACTORY = '''
import torch
from torch import nn

def make(batch=4):
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 1))
    return model, (torch.randn(batch, 64),), lambda out: out.pow(2).mean()

def broken():
    raise RuntimeError("factory exploded")


class Regressor(nn.Module):  # as Hugging Face models are: inputs by name, trunc_normal_ init, returns .loss
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 1))
        nn.init.trunc_normal_(self.body[0].weight, std=0.02)  # reads a value: no fake-tensor build

    def forward(self, features, labels):
        return type("Output", (), {"loss": (self.body(features) - labels).pow(2).mean()})()


def by_name(batch=4, seq=32):
    return Regressor(), {"features": torch.randn(batch, seq, 64), "labels": torch.zeros(batch, seq, 1)}


class Routed(nn.Module):  # mixture-of-experts routing by a boolean mask: as many rows as the mask holds
    def __init__(self):
        super().__init__()
        self.gate, self.expert = nn.Linear(64, 2), nn.Linear(64, 1)

    def forward(self, x):
        return self.expert(x[self.gate(x).argmax(-1) == 0]).pow(2).mean()


def routed(batch=4):
    return Routed(), (torch.randn(batch, 64),)


def llama(batch=4):  # cast in the factory: fake parameters refuse the swap that .to() makes
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 1)).to(torch.bfloat16)
    return model, (torch.randn(batch, 64, dtype=torch.bfloat16),)


def wrong_features(batch=4):
    return nn.Sequential(nn.Linear(10, 3)), (torch.randn(batch, 7),)


def needs_seq(seq, batch=4):
    return nn.Sequential(nn.Linear(seq, 1)), (torch.randn(batch, seq),)


class NamedLayers(nn.Module):  # no numbered blocks: per-block checkpointing does not apply
    def __init__(self):
        super().__init__()
        self.first, self.second, self.last = nn.Linear(64, 256), nn.Linear(256, 256), nn.Linear(256, 10)

    def forward(self, x, y):
        return nn.functional.cross_entropy(self.last(torch.tanh(self.second(torch.tanh(self.first(x))))), y)


def named_layers(batch=512):
    return NamedLayers(), (torch.randn(batch, 64), torch.randint(0, 10, (batch,)))


def logits(batch=4):  # no loss: the caller's loss is made of the one tensor it returns
    return nn.Sequential(nn.Linear(64, 10)), (torch.randn(batch, 64),)


class LossAndLogits(nn.Module):  # as a Hugging Face model called with labels: the loss, and logits beside it
    def __init__(self):
        super().__init__()
        self.head = nn.Linear(64, 10)

    def forward(self, x, y):
        logits = self.head(x)
        return {"loss": nn.functional.cross_entropy(logits, y), "logits": logits}


def loss_and_logits(batch=4):
    return LossAndLogits(), (torch.randn(batch, 64), torch.randint(0, 10, (batch,)))


def four_samples(batch=4):
    if batch > 4:
        raise ValueError(f"only 4 samples, not {batch}")
    return make(batch)
'''


@pytest.fixture(scope="module")
def factory_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("user") / "mymodel.py"
    path.write_text(FACTORY)
    return path


def assert_one_line_error(result, *words):
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    for word in words:
        assert word in lines[0], lines[0]


@pytest.mark.parametrize("budget", ["16XB", "-3GB", "lots"])
def test_unreadable_budget(budget):
    assert_one_line_error(remat("solve", "--model", "mlp", "--budget", budget), "--budget")


def test_unknown_model():
    assert_one_line_error(remat("solve", "--model", "gpt5", "--budget", "16GB", process=True), "gpt5", "gpt2")


def test_unknown_solver():
    assert_one_line_error(remat("solve", "--model", "mlp", "--budget", "16GB", "--solver", "magic"),
                          "magic", "checkmate")


def test_missing_factory_file(tmp_path):
    assert_one_line_error(remat("solve", "--model", f"{tmp_path}/nope.py:make", "--budget", "1GB"), "nope.py")


def test_factory_that_raises(factory_file):
    assert_one_line_error(remat("solve", "--model", f"{factory_file}:broken", "--budget", "1GB"), "factory exploded")


def test_a_step_that_cannot_be_traced_names_the_line_as_written(factory_file):
    """The model's line is printed as it is, brackets included (the console would read `[mask]` as markup)."""
    assert_one_line_error(remat("solve", "--model", f"{factory_file}:routed", "--budget", "1GB"),
                          "output shape depends on tensor values", "mymodel.py:",
                          "`return self.expert(x[self.gate(x).argmax(-1) == 0]).pow(2).mean()`")


def test_unknown_device(factory_file):
    assert_one_line_error(remat("solve", "--model", f"{factory_file}:make", "--budget", "1GB", "--device", "tpu9"),
                          "tpu9", "h100")


def test_infeasible_budget_names_the_minimum(factory_file):
    # below fixed memory (parameters, gradients and Adam's state: 1.3 MB) no plan can fit, and the error says why
    below = remat("solve", "--model", f"{factory_file}:make", "--budget", "100KB", "--json", "--time-limit", "2")
    assert below.returncode == 2 and "Traceback" not in below.stderr
    summary = json.loads(below.stdout)
    assert summary["status"] == "infeasible" and summary["min_feasible_bytes"] is None
    fixed = summary["fixed_bytes"]
    assert fixed > 100_000 and "fixed memory alone is" in below.stderr and "--optimizer sgd" in below.stderr
    # above it, a budget too small for any schedule gets the minimum named
    result = remat("solve", "--model", f"{factory_file}:make", "--budget", str(fixed + 1), "--json",
                   "--time-limit", "2")  # an infeasible solve spends its whole limit looking for the lowest peak
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    summary = json.loads(result.stdout)
    assert summary["status"] == "infeasible"
    minimum = summary["min_feasible_bytes"]
    assert minimum > fixed + 1
    # (named a minimum only where it is proven: a 2-s search names the lowest peak it found, which a longer may beat)
    assert str(minimum) in result.stderr and ("the minimum feasible budget is" in result.stderr
                                              or "the lowest peak found in the time limit is" in result.stderr)
    # and a budget 1% above that minimum gets a plan
    again = remat("solve", "--model", f"{factory_file}:make", "--budget", str(int(minimum * 1.01)), "--json",
                  "--time-limit", "5")
    assert again.returncode == 0, again.stderr
    plan = json.loads(again.stdout)
    assert plan["status"] in ("optimal", "feasible") and plan["peak_bytes"] <= int(minimum * 1.01)


@pytest.fixture(scope="module")
def probe(factory_file):
    """A plan with room to spare: store-all, and the figures to pick a tighter budget from."""
    summary = json.loads(remat("solve", "--model", f"{factory_file}:make", "--budget", "1GB", "--json").stdout)
    assert summary["status"] == "optimal" and summary["overhead"] == 0 and summary["solver"] == "store-all"
    return summary


def test_budget_as_a_share_of_the_store_all_peak(factory_file, probe):
    store_all, lowest = probe["store_all_peak_bytes"], probe["min_feasible_bytes"]
    percent = round(100 * (store_all + lowest) / 2 / store_all, 1)  # halfway between the minimum and store-all
    result = remat("solve", "--model", f"{factory_file}:make", "--budget", f"{percent}%", "--json",
                   "--time-limit", "10")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert abs(summary["budget_bytes"] - percent / 100 * store_all) <= 1
    assert summary["budget_share_of_bytes"] == store_all  # what the share is of, whatever the plan splits
    assert summary["peak_bytes"] <= summary["budget_bytes"] and summary["overhead"] > 0
    assert_one_line_error(remat("solve", "--model", f"{factory_file}:make", "--budget", "90 %%"), "--budget")


def test_user_model_plan_json_and_plan_file(factory_file, probe, tmp_path):
    out = tmp_path / "plans" / "plan.json"  # a folder that does not exist yet: made before the solve
    budget = (probe["store_all_peak_bytes"] + probe["min_feasible_bytes"]) // 2
    result = remat("solve", "--model", f"{factory_file}:make", "--budget", str(budget), "--json", "--out", str(out),
                   "--time-limit", "20", process=True)  # stdout holds the JSON alone, whatever HiGHS prints
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    for key in ("model", "batch", "seq", "device", "budget_bytes", "fixed_bytes", "solver", "status", "peak_bytes",
                "compute_s", "store_all_s", "store_all_peak_bytes", "overhead", "lower_bound_s", "gap", "wall_s",
                "nodes"):
        assert key in summary
    assert summary["budget_bytes"] == budget and summary["batch"] == 4  # no --batch: the factory's own default
    assert summary["peak_bytes"] <= budget < summary["store_all_peak_bytes"]
    assert summary["overhead"] == pytest.approx(summary["compute_s"] / summary["store_all_s"] - 1)
    assert summary["overhead"] > 0
    assert summary["lower_bound_s"] <= summary["compute_s"] and summary["lower_bound_method"]  # what proves the bound
    baselines = [c for c in summary["candidates"] if c["fits"]]
    assert summary["compute_s"] <= min(c["compute_s"] for c in baselines) * (1 + 1e-9)
    plan = json.loads(out.read_text())
    assert plan["graph_hash"] and plan["schedule"]["ops"]
    # remat run takes the plan's precision and optimizer; asked for others, it says so before building anything
    for option, value in (("--precision", "fp32"), ("--optimizer", "sgd")):
        assert_one_line_error(remat("run", "--model", f"{factory_file}:make", "--plan", str(out), option, value),
                              f"the plan was made for {option} ")


def test_an_output_whose_folder_is_a_file_is_a_one_line_error(tmp_path):
    (tmp_path / "afile").touch()  # "cannot make its folder afile: File exists", in click's three-line usage error
    result = remat("solve", "--model", "mlp", "--budget", "100%", "--out", str(tmp_path / "afile" / "p.json"))
    assert_one_line_error(result, "--out: cannot make its folder", "a file of that name is in the way")


def test_outputs_that_cannot_be_written_are_one_line_errors(factory_file, tmp_path):
    # a file that cannot be made (a folder of that name; /sys, which os.access allows root) is said before the solve;
    # a report's PNG that cannot be written after it: both ended in a traceback after the whole solve
    (tmp_path / "plan.json").mkdir()
    result = remat("solve", "--model", f"{factory_file}:make", "--budget", "100%", "--out", str(tmp_path / "plan.json"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "is a directory" in result.stderr.lower() and not result.stdout
    (tmp_path / "r-curve.png").mkdir()
    result = remat("compare", "--model", f"{factory_file}:make", "--budget", "100%", "--solvers", "store-all",
                   "--md", str(tmp_path / "r.md"))
    assert_one_line_error(result, "could not write the report: Is a directory", "r-curve.png")


def test_a_factory_that_casts_its_model_plans_and_its_name_prints_as_written(factory_file):
    """`.to(torch.bfloat16)` in a factory failed on fake parameters ("Couldn't swap Linear.weight"), blamed on the
    factory; and rich printed `mymodel.py:llama` with a llama emoji."""
    assert_one_line_error(remat("solve", "--model", f"{factory_file}:llama", "--budget", "1KB"),
                          "mymodel.py:llama", "fixed memory alone")


def test_a_shape_error_in_the_model_is_one_line_without_torchs_logged_traceback(factory_file):
    assert_one_line_error(remat("solve", "--model", f"{factory_file}:wrong_features", "--budget", "1GB", process=True),
                          "could not trace the training step")


def test_a_factory_whose_seq_has_no_default_asks_for_seq(factory_file):
    assert_one_line_error(remat("solve", "--model", f"{factory_file}:needs_seq", "--budget", "1GB"), "give --seq")


def test_a_baseline_asked_by_name_that_does_not_fit_names_its_own_peak(factory_file, probe):
    """It said "the minimum feasible budget found is 2.27 MB; use --budget 2.28MB or more" of a 2.58-MB budget: the
    minimum of other methods' plans, not of the one asked for."""
    budget = (probe["store_all_peak_bytes"] + probe["min_feasible_bytes"]) // 2
    result = remat("solve", "--model", f"{factory_file}:make", "--budget", str(budget), "--solver", "store-all",
                   "--time-limit", "2")
    assert_one_line_error(result, "store-all's schedule", "peaks at", "--solver auto, whose plans go down to")
    # a baseline that makes no schedule of this graph says why (it named a lowest peak under the budget given)
    result = remat("solve", "--model", f"{factory_file}:named_layers", "--budget", "80%", "--solver", "per-block",
                   "--time-limit", "2")
    assert_one_line_error(result, "with --solver per-block: no repeated blocks", "--solver auto plans for any graph")


def test_maxbatch_of_a_factory_that_fails_at_a_larger_batch_and_of_a_share(factory_file):
    assert_one_line_error(remat("maxbatch", "--model", "mlp", "--budget", "80%"), "not a share")
    result = remat("compare", "--model", f"{factory_file}:four_samples", "--budget", "150%", "--max-batch",
                   "--solvers", "store-all", "--time-limit", "1")
    assert_one_line_error(result, "only 4 samples")


def test_user_model_with_inputs_by_name_and_value_reading_init(factory_file):
    result = remat("solve", "--model", f"{factory_file}:by_name", "--budget", "1GB", "--batch", "2", "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["status"] == "optimal" and summary["peak_bytes"] <= 10**9
    assert summary["batch"] == 2 and summary["nodes"] > 10


def test_human_output_explains_the_budget(factory_file, probe):
    budget_mib = f"{(probe['store_all_peak_bytes'] + probe['min_feasible_bytes']) / 2 / 2**20:.3f}"
    result = remat("solve", "--model", f"{factory_file}:make", "--budget", f"{budget_mib}MiB", "--time-limit", "5")
    text = result.stdout
    assert result.returncode == 0, result.stderr
    assert "HiGHS" not in text + result.stderr  # its C++ banner once opened the report
    assert f"{int(float(budget_mib) * 2**20):,} bytes" in text
    for words in ("fixed memory", "store-all", "plan", "recomputed", "minimum budget", "chen-sqrtn"):
        assert words in text
    bound_line = next(line for line in text.splitlines() if line.startswith("bound "))
    assert "(covering" in bound_line or "(milp" in bound_line or "(store-all" in bound_line, bound_line
    # the table marks the plan's row, with the plan's status (a proven plan's row said "feasible")
    plan_line = next(line for line in text.splitlines() if line.startswith("plan "))
    status = plan_line.split("(")[1].split(")")[0]
    rows = [line for line in text.splitlines() if " * " in line]
    assert len(rows) == 1 and f" {status} " in rows[0] and "* the plan" in text, (plan_line, rows)
    # store-all peaks above this budget: its row says so, where it said "feasible" beside "fits: no"
    store_all = next(line for line in text.splitlines() if line.startswith("│ store-all "))
    assert " over_budget " in store_all and store_all.rstrip(" │").split("│")[-2].strip() == "no", store_all


def test_a_plan_far_from_a_bound_cut_short_by_time_says_a_longer_limit_may_help(capsys):
    import dataclasses

    from cli import _print_plan
    from remat.planner import solve
    from solvers.base import FEASIBLE
    from tests.graphs import chain_training_graph

    proven = solve(chain_training_graph(10), 10**6, time_limit_s=10)  # store-all fits: optimal at once
    assert proven.status == "optimal" and proven.gap < 1e-6
    _print_plan(proven, 1.0, None)
    assert "hint" not in capsys.readouterr().out
    # GPT-2 XL at 70% in 60 s: the covering MILP's root did not finish in its share, the gap is against every node once
    cut = dataclasses.replace(proven, status=FEASIBLE, lower_bound_s=0.9 * proven.compute_s,
                              lower_bound_method="covering (not solved in time: every node once)")
    _print_plan(cut, 1.0, None)
    assert "a longer --time-limit tightens the bound" in capsys.readouterr().out
    close = dataclasses.replace(cut, lower_bound_s=0.995 * proven.compute_s)  # within 1%: no hint
    _print_plan(close, 1.0, None)
    assert "hint" not in capsys.readouterr().out


def test_maxbatch_under_the_model_state_says_no_batch_fits_at_once(factory_file):
    # parameters, gradients and Adam's state (1.3 MB) fit no batch: no search down to batch 1
    result = remat("maxbatch", "--model", f"{factory_file}:make", "--budget", "1MB", "--solvers", "store-all",
                   "--json")
    assert_one_line_error(result, "no batch fits", "optimizer state alone are", "--optimizer sgd")
    assert [r["probes"] for r in json.loads(result.stdout)["results"]] == [[[16, False]]]  # one trace, no search
    table = remat("maxbatch", "--model", f"{factory_file}:make", "--budget", "1MB", "--solvers", "auto")
    assert "no batch fits" in table.stderr and "16x" in table.stdout
    assert "none found in --time-limit" not in table.stdout  # (nothing was searched: it said so)
    lighter = remat("maxbatch", "--model", f"{factory_file}:make", "--budget", "1MB", "--optimizer", "none",
                    "--solvers", "store-all", "--json")  # parameters and gradients: 662 KB, room for a batch
    assert lighter.returncode == 0, lighter.stderr
    assert json.loads(lighter.stdout)["results"][0]["max_batch"] > 0


@pytest.mark.parametrize(("num_bytes", "suggested"), [
    (6_888_412, "6.89MB"), (11_868_000_001, "11.87GB"), (10**9, "1.00GB"), (2_345, "2.35KB"), (999, "999B")])
def test_the_suggested_budget_is_the_minimum_rounded_up_in_its_own_unit(num_bytes, suggested):
    # a 6.89 MB minimum was suggested as "0.01GB"
    from cli import _ceil_size
    from remat.units import parse_size

    assert _ceil_size(num_bytes) == suggested and parse_size(suggested) >= num_bytes


def test_the_readme_classifier_factory_plans(tmp_path):
    # the README's example of labels as inputs, as a user would copy it
    readme = (ROOT / "README.md").read_text()
    block = readme.split("  # my_classifier.py\n", 1)[1].split("  ```", 1)[0]
    path = tmp_path / "my_classifier.py"
    path.write_text("\n".join(line.removeprefix("  ") for line in block.splitlines()))
    result = remat("solve", "--model", f"{path}:make", "--budget", "80%", "--time-limit", "10", "--json")
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["peak_bytes"] <= plan["budget_bytes"] and plan["overhead"] > 0  # it recomputes to fit


def test_remat_run_with_another_zoo_models_plan_names_the_model(tmp_path):
    """A gpt2-tiny plan run on mlp said "--seq applies to language models only", where no --seq was given: the
    plan's sequence length was taken before its model was compared."""
    out = tmp_path / "plan.json"
    made = remat("solve", "--model", "gpt2-tiny", "--batch", "2", "--seq", "32", "--budget", "100%", "--time-limit",
                 "2", "--out", str(out))
    assert made.returncode == 0, made.stderr
    assert_one_line_error(remat("run", "--model", "mlp", "--plan", str(out)),
                          "the plan was made for --model gpt2-tiny, not mlp")


def test_the_floor_is_named_with_the_chunk_counts_it_is_of(capsys, monkeypatch):
    """The floor printed is the lowest over the chunk counts traced (split_plan's meta "floor_at"): it was labelled
    with the plan's own ("with the head in 2 chunks" beside the floor of the head in 8 and MLPs in 2)."""
    import dataclasses

    from cli import _print_plan
    from remat.planner import solve
    from tests.graphs import chain_training_graph

    monkeypatch.setenv("COLUMNS", "400")  # one line each
    plan = solve(chain_training_graph(10), 10**6, time_limit_s=10)
    _print_plan(plan, 1.0, None)
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("minimum budget"))
    assert line.endswith("the largest single op's working set)")  # unsplit: no chunk counts to name
    graph = dataclasses.replace(plan.graph, meta={**plan.graph.meta, "floor_at": "with the head in 8 chunks"})
    _print_plan(dataclasses.replace(plan, graph=graph), 1.0, None)
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("minimum budget"))
    assert line.endswith("working set with the head in 8 chunks)")


def test_lines_longer_than_the_terminal_print_whole(capsys, monkeypatch):
    """Piped into a file, the main job's "minimum budget" and "plan" lines (158 characters) were cut at the console's
    width, mid-sentence ("the split step's" / "own)"), where the README shows them whole."""
    import dataclasses

    from cli import _print_plan
    from remat.planner import solve
    from tests.graphs import chain_training_graph

    monkeypatch.setenv("COLUMNS", "80")
    plan = solve(chain_training_graph(10), 10**6, time_limit_s=10)
    graph = dataclasses.replace(plan.graph, meta={**plan.graph.meta, "floor_at": "with the head in 8 chunks"})
    _print_plan(dataclasses.replace(plan, graph=graph), 1.0, None)
    lines = capsys.readouterr().out.splitlines()
    line = next(x for x in lines if x.startswith("minimum budget"))
    assert len(line) > 80 and line.endswith("working set with the head in 8 chunks)"), line
    assert any(x.startswith("┏") for x in lines)  # the table is still drawn


def test_a_share_below_fixed_memory_says_what_share_fixed_memory_takes(factory_file):
    """A small model's AdamW state is most of its store-all peak: "60%" fits nothing, and the error said only the
    bytes (the README's own shares failed so on small models)."""
    result = remat("solve", "--model", f"{factory_file}:make", "--budget", "10%")
    assert_one_line_error(result, "fixed memory alone is", "as a share of the store-all peak")
    share = float(result.stderr.rsplit("fixed memory alone is ", 1)[1].split("%")[0])
    assert 10 < share < 100


def test_outputs_all_on_a_model_that_returns_one_tensor_alone_says_so(factory_file):
    """--outputs all on a model planned as --outputs loss, the same graph, without a word; the note said "returns its
    loss alone" of a model that returns its logits too."""
    said = ("returns one tensor alone (its loss, or the logits a loss is made of): --outputs all has no other tensor "
            "to hand out")

    def note(*args):
        result = remat("solve", *args, "--budget", "100%", "--outputs", "all", "--json")
        assert result.returncode == 0, result.stderr
        return result.stderr  # one line: the note was cut at 80 columns in a pipe

    assert said in note("--model", "mlp", "--batch", "2")
    assert said in note("--model", f"{factory_file}:logits")
    assert said in note("--model", f"{factory_file}:make")  # its output goes to its loss_fn, the loss comes back
    # (this case asserted the note's absence, and passed only because the console wrapped the line it looked for)
    assert said not in note("--model", f"{factory_file}:loss_and_logits")  # the logits are handed out


def test_a_budget_over_the_devices_memory_plans_with_a_note(factory_file):
    # v100's profile holds 32 GiB: 40GB plans (store-all fits) and says the plan does not fit that device
    over = remat("solve", "--model", f"{factory_file}:make", "--budget", "40GB", "--device", "v100", "--json",
                 "--time-limit", "2")
    assert over.returncode == 0, over.stderr
    assert json.loads(over.stdout)["status"] == "optimal"
    assert "note: the budget 40.00 GB is more than v100's memory (34.36 GB)" in over.stderr
    under = remat("solve", "--model", f"{factory_file}:make", "--budget", "30GB", "--device", "v100", "--json",
                  "--time-limit", "2")
    assert under.returncode == 0 and "memory" not in under.stderr
    maxbatch = remat("maxbatch", "--model", f"{factory_file}:make", "--budget", "1TB", "--device", "cpu",
                     "--solvers", "store-all", "--json")
    assert "note: the budget 1.00 TB is more than cpu" in maxbatch.stderr


def test_every_option_of_every_command_says_what_it_is():
    """`remat profile --help` listed --warmup and --repeats with a default and no word of what they count."""
    from cli import main

    for name, command in main.commands.items():
        for param in command.params:
            if isinstance(param, click.Option):
                assert param.help, f"remat {name} {param.opts[0]} has no help text"


def _readme_synopses() -> dict[str, str]:
    """Each `remat COMMAND ...` synopsis in README.md's code blocks, continuation lines joined."""
    synopses: dict[str, str] = {}
    blocks = (ROOT / "README.md").read_text().split("```")[1::2]
    for block in blocks:
        command = None
        for line in block.splitlines():
            if line.startswith("remat "):
                command = line.split()[1]
                synopses[command] = line
            elif command and line.startswith(" ") and line.strip().startswith("["):
                synopses[command] += " " + line.strip()
            else:
                command = None
    return synopses


def test_the_readme_synopses_name_every_option_and_its_default():
    """What README.md's synopsis of each command names is what `remat COMMAND --help` takes, and the other way
    round, with the same defaults."""
    import re

    from cli import main

    synopses = _readme_synopses()
    assert set(synopses) == set(main.commands), sorted(synopses)
    for name, synopsis in synopses.items():
        options = {p.opts[0]: p for p in main.commands[name].params if isinstance(p, click.Option)}
        named = set(re.findall(r"(--[a-z-]+)", synopsis))
        assert named == set(options) - {"--help"}, (name, sorted(named ^ (set(options) - {"--help"})))
        for option, value in re.findall(r"\[(--[a-z-]+) ([^\]| ]+)\]", synopsis):
            default = options[option].default
            if (not isinstance(default, (int, float, str)) or isinstance(default, bool)  # no default (None, unset)
                    or "|" in value or value in ("N", "...")):
                continue  # a placeholder, a choice list, or an example of a value with no default
            assert str(default) == value or (isinstance(default, float) and default == float(value)), \
                (name, option, value, default)


def test_a_floor_over_the_single_op_floor_is_named_for_what_proves_it(capsys, monkeypatch):
    """The walk back from the step's end proves a floor over fixed memory and the largest op's working set: the line
    named that floor's reason for the higher one."""
    from cli import _print_plan
    from remat.planner import solve
    from tests.graphs import step_whose_lowest_peak_recomputes

    monkeypatch.setenv("COLUMNS", "400")  # one line each
    plan = solve(step_whose_lowest_peak_recomputes(), 7300, time_limit_s=1)
    assert plan.min_budget_lower_bound_bytes == 7264 > plan.graph.min_budget_lower_bound()
    _print_plan(plan, 1.0, None)
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("minimum budget"))
    assert line.endswith("(no schedule fits below 7.26 KB: what every schedule holds at some moment before the "
                         "step's last op (the walk back from its end))"), line
