"""The model zoo and `file.py:factory` loading: real forward/backward, fake-tensor builds, user errors."""

import math
import textwrap

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

from remat import models
from remat.models import DEFAULT_BATCH, ModelError, ModelSpec, build_model, count_parameters
from remat.zoo import ZOO_NAMES

# torchvision's figures for the same architectures; Hugging Face's for GPT-2 small (tied lm_head)
REFERENCE_PARAMETERS = {
    "resnet50": 25_557_032,
    "vgg16": 138_357_544,
    "mobilenet_v2": 3_504_872,
    "densenet121": 7_978_856,
    "gpt2": 124_439_808,
    "gpt2-medium": 354_823_168,
    "gpt2-xl": 1_557_611_200,
}


def training_loss(spec: ModelSpec) -> torch.Tensor:
    inputs = spec.example_inputs
    output = spec.model(**inputs) if isinstance(inputs, dict) else spec.model(*inputs)
    loss = spec.loss_fn(output) if spec.loss_fn is not None else output
    return getattr(loss, "loss", loss)


def assert_one_line_error(error: pytest.ExceptionInfo, *fragments: str) -> None:
    message = str(error.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


def test_zoo_names():
    assert set(ZOO_NAMES) == {"gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "gpt2-tiny", "llama", "llama-tiny",
                              "mlp", "mlp-xc", "vgg16", "resnet50", "mobilenet_v2", "unet", "densenet121"}
    # the torch-free list the CLI checks a name against is the one the zoo builds from
    assert ZOO_NAMES == (*models.GPT2_SIZES, *models.LLAMA_SIZES, *models.IMAGE_TASKS)


SLOW = pytest.mark.slow  # torchvision's own networks at 224 x 224 on a CPU: 8 to 22 s each; U-Net at 256 x 256, 10 s
#                           (its class trains on real tensors by default, at base 4: test_apply.py's
#                           test_any_rows_run_with_the_bytes_the_simulator_counts[4])


@pytest.mark.parametrize("name, batch", [("gpt2-tiny", 2), ("mlp", 2), ("mobilenet_v2", 1),
                                         pytest.param("unet", 1, marks=SLOW),
                                         pytest.param("resnet50", 1, marks=SLOW),
                                         pytest.param("vgg16", 1, marks=SLOW),
                                         pytest.param("densenet121", 1, marks=SLOW)])
def test_zoo_model_trains_on_real_tensors(name, batch):
    torch.manual_seed(0)
    spec = build_model(name, batch=batch)
    assert spec.name == name and spec.batch == batch and spec.loss_fn is None
    assert all(x.shape[0] == batch for x in spec.example_inputs)
    loss = training_loss(spec)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    parameters = list(spec.model.parameters())
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in parameters)
    assert sum(p.grad.abs().sum() for p in parameters) > 0


def test_gpt2_tiny_predicts_near_uniform_and_keeps_weights_tied():
    spec = build_model("gpt2-tiny", batch=2, seq=32)
    (input_ids,) = spec.example_inputs
    assert input_ids.shape == (2, 32) and input_ids.dtype == torch.int64
    assert spec.seq == 32
    assert abs(training_loss(spec).item() - math.log(1000)) < 0.5  # random init: about ln(vocab)
    lm = spec.model.lm
    assert lm.lm_head.weight is lm.transformer.wte.weight


def test_gpt2_config_has_no_dropout_and_uses_sdpa():
    with FakeTensorMode():
        spec = build_model("gpt2-tiny", batch=1)
    config = spec.model.lm.config
    assert (config.resid_pdrop, config.embd_pdrop, config.attn_pdrop) == (0.0, 0.0, 0.0)
    assert config._attn_implementation == "sdpa"
    assert spec.seq == 256  # n_positions by default


@pytest.mark.parametrize("name", sorted(REFERENCE_PARAMETERS))
def test_parameter_counts_match_reference(name):
    with FakeTensorMode():
        spec = build_model(name, batch=1, seq=8 if name.startswith("gpt2") else None)
    count = count_parameters(spec.model)
    assert abs(count - REFERENCE_PARAMETERS[name]) <= 0.01 * REFERENCE_PARAMETERS[name], count
    assert f"{REFERENCE_PARAMETERS[name] / 1e6:.1f}M" in spec.description or "B params" in spec.description


@pytest.mark.parametrize("name", ZOO_NAMES)
def test_every_zoo_model_builds_and_runs_on_fake_tensors_at_default_batch(name):
    """The capture path: build inside FakeTensorMode at the CLI's default batch 16, no real memory."""
    with FakeTensorMode():
        spec = build_model(name)
        loss = training_loss(spec)
    assert spec.batch == 16 and spec.description
    assert all(isinstance(p, FakeTensor) for p in spec.model.parameters())
    assert all(isinstance(x, FakeTensor) and x.shape[0] == 16 for x in spec.example_inputs)
    assert isinstance(loss, FakeTensor) and loss.dim() == 0
    if name.startswith(("gpt2", "llama")):
        positions = 256 if name.endswith("-tiny") else 1024  # the default sequence length
        assert spec.seq == positions and spec.example_inputs[0].shape == (16, positions)
    else:
        assert spec.seq is None


@pytest.mark.parametrize("name, path", [("resnet50", "layer2.1.conv1"), ("resnet50", "layer4.0.downsample"),
                                        ("vgg16", "features.3"), ("mobilenet_v2", "features.3.conv"),
                                        ("unet", "downs.3.conv"), ("unet", "ups.0.up"), ("mlp", "blocks.6.fc"),
                                        ("gpt2-tiny", "lm.transformer.h.1.attn"),
                                        ("densenet121", "features.denseblock3.denselayer24.conv2"),
                                        ("densenet121", "features.transition2.pool")])
def test_repeated_blocks_have_indexed_module_paths(name, path):
    with FakeTensorMode():
        spec = build_model(name, batch=1)
    assert path in dict(spec.model.named_modules())


def test_image_inputs_and_labels_have_the_documented_shapes():
    with FakeTensorMode():
        unet = build_model("unet", batch=2)
        resnet = build_model("resnet50", batch=2)
        mlp = build_model("mlp", batch=2)
    images, labels = unet.example_inputs
    assert images.shape == (2, 3, 256, 256) and labels.shape == (2, 256, 256) and labels.dtype == torch.int64
    images, labels = resnet.example_inputs
    assert images.shape == (2, 3, 224, 224) and labels.shape == (2,) and labels.dtype == torch.int64
    features, labels = mlp.example_inputs
    assert features.shape == (2, 1024) and labels.shape == (2,)


def test_seq_longer_than_positions_is_refused():
    with pytest.raises(ModelError) as error:
        build_model("gpt2", seq=2048)
    assert_one_line_error(error, "2048", "1024", "--seq")


@pytest.mark.parametrize("name", ["resnet50", "mlp", "unet"])
def test_seq_on_a_non_language_model_is_refused(name):
    with pytest.raises(ModelError) as error:
        build_model(name, seq=128)
    assert_one_line_error(error, "--seq", "language models only", name)


@pytest.mark.parametrize("batch, seq", [(0, None), (-1, None), (2.5, None), (2, 0)])
def test_nonpositive_batch_or_seq_is_refused(batch, seq):
    with pytest.raises(ModelError) as error:
        build_model("gpt2-tiny", batch=batch, seq=seq)
    assert_one_line_error(error, "positive integer")


def test_unknown_name_lists_the_zoo_and_the_factory_form():
    with pytest.raises(ModelError) as error:
        build_model("gpt5")
    assert_one_line_error(error, "gpt5", "gpt2-medium", "resnet50", "unet", "file.py:factory")
    assert isinstance(error.value, ValueError)


# ----------------------------------------------------------------------------------------------------------
# User factories

TWO_LAYER_NET = """
import torch
from torch import nn
from dataclasses import dataclass


@dataclass
class Sizes:  # a dataclass in the file needs the module registered while it loads
    features: int = 8
    classes: int = 3


class Net(nn.Module):
    def __init__(self, sizes=Sizes()):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(sizes.features, 16), nn.ReLU(), nn.Linear(16, sizes.classes))

    def forward(self, x):
        return self.body(x)
"""


def write(tmp_path, source: str, name: str = "user_model.py") -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(TWO_LAYER_NET) + textwrap.dedent(source))
    return str(path)


def test_factory_without_arguments_returning_model_and_a_single_tensor(tmp_path):
    path = write(tmp_path, """
        def make():
            model = Net()
            return model, torch.randn(5, 8)
        """)
    spec = build_model(f"{path}:make")
    assert spec.name == f"{path}:make" and spec.loss_fn is None
    assert isinstance(spec.example_inputs, tuple) and spec.example_inputs[0].shape == (5, 8)
    assert spec.batch == 5  # the factory fixed its own batch
    assert spec.seq is None and "params" in spec.description
    assert training_loss(spec).shape == (5, 3)  # not a scalar: capture sums it


def test_factory_with_batch_seq_and_loss_fn(tmp_path):
    path = write(tmp_path, """
        def make(batch=4, seq=None):
            model = Net()
            x = torch.randn(batch, seq or 1, 8)
            return model, (x,), lambda out: out.pow(2).mean()
        """)
    spec = build_model(f"{path}:make", batch=3, seq=7)
    assert spec.batch == 3 and spec.seq == 7
    assert spec.example_inputs[0].shape == (3, 7, 8)
    loss = training_loss(spec)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None for p in spec.model.parameters())


def test_factory_taking_only_batch_or_kwargs(tmp_path):
    path = write(tmp_path, """
        def only_batch(batch):
            return Net(), [torch.randn(batch, 8)]

        def anything(**options):
            return Net(), torch.randn(options["batch"], 8), None
        """)
    spec = build_model(f"{path}:only_batch", batch=6)
    assert spec.example_inputs[0].shape == (6, 8) and isinstance(spec.example_inputs, tuple)
    assert build_model(f"{path}:anything", batch=2, seq=9).example_inputs[0].shape == (2, 8)


def test_factory_runs_on_fake_tensors(tmp_path):
    path = write(tmp_path, """
        def make(batch):
            return Net(), torch.randn(batch, 8)
        """)
    with FakeTensorMode():
        spec = build_model(f"{path}:make", batch=1024)
    assert isinstance(spec.example_inputs[0], FakeTensor) and spec.batch == 1024


def test_two_factory_files_with_the_same_name_stay_apart(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = write(tmp_path / "a", "WIDTH = 8\ndef make():\n    return Net(), torch.randn(1, WIDTH)\n", "model.py")
    second = write(tmp_path / "b", "WIDTH = 8\ndef make():\n    return Net(Sizes(classes=5)), torch.randn(1, WIDTH)\n",
                   "model.py")
    assert training_loss(build_model(f"{first}:make")).shape == (1, 3)
    assert training_loss(build_model(f"{second}:make")).shape == (1, 5)


def test_factory_file_can_import_its_neighbours(tmp_path):
    (tmp_path / "helper_layers_for_remat_test.py").write_text("from torch import nn\nWIDTH = 4\n")
    path = write(tmp_path, """
        import helper_layers_for_remat_test as helper
        def make():
            return nn.Linear(helper.WIDTH, 1), torch.randn(2, helper.WIDTH)
        """)
    assert build_model(f"{path}:make").example_inputs[0].shape == (2, 4)


def test_missing_file(tmp_path):
    with pytest.raises(ModelError) as error:
        build_model(f"{tmp_path}/nope.py:make")
    assert_one_line_error(error, "nope.py", "not found")


def test_missing_function_lists_the_functions_there(tmp_path):
    path = write(tmp_path, "def make_model():\n    return Net(), torch.randn(1, 8)\n")
    with pytest.raises(ModelError) as error:
        build_model(f"{path}:make")
    assert_one_line_error(error, "no function 'make'", "make_model")


def test_file_that_raises_on_import(tmp_path):
    path = write(tmp_path, "raise RuntimeError('needs a GPU\\nsecond line')\n")
    with pytest.raises(ModelError) as error:
        build_model(f"{path}:make")
    assert_one_line_error(error, "importing", "RuntimeError: needs a GPU")


def test_file_with_a_syntax_error(tmp_path):
    path = write(tmp_path, "def make(:\n")
    with pytest.raises(ModelError) as error:
        build_model(f"{path}:make")
    assert_one_line_error(error, "SyntaxError")


def test_factory_that_raises(tmp_path):
    path = write(tmp_path, "def make():\n    raise KeyError('weights.pt')\n")
    with pytest.raises(ModelError) as error:
        build_model(f"{path}:make")
    assert_one_line_error(error, ":make raised KeyError", "weights.pt")


def test_factory_reading_tensor_values_fails_clearly_under_fake_mode(tmp_path):
    path = write(tmp_path, """
        def make():
            x = torch.randn(2, 8)
            if x.sum().item() > 1e9:  # data-dependent Python: impossible on fake tensors
                pass
            return Net(), x
        """)
    with FakeTensorMode(), pytest.raises(ModelError) as error:
        build_model(f"{path}:make")
    assert_one_line_error(error, ":make raised")


@pytest.mark.parametrize("returned, fragment", [
    ("Net()", "returned Net"),
    ("(Net(),)", "of length 1"),
    ("(Net(), torch.randn(1, 8), None, None)", "of length 4"),
    ("('net', torch.randn(1, 8))", "not a torch.nn.Module"),
    ("(Net(), {0: torch.randn(1, 8)})", "keys that are not all strings"),
    ("(Net(), {'x'})", "example_inputs of type set"),
    ("(Net(), torch.randn(1, 8), 'mse')", "as loss_fn"),
])
def test_factory_returning_the_wrong_thing(tmp_path, returned, fragment):
    path = write(tmp_path, f"def make():\n    return {returned}\n")
    with pytest.raises(ModelError) as error:
        build_model(f"{path}:make")
    assert_one_line_error(error, fragment, ":make")


def test_factory_keeps_its_own_seq_default_when_no_seq_is_given(tmp_path):
    path = write(tmp_path, """
        def make(batch=4, seq=12):
            return Net(), torch.randn(batch, seq, 8)
        """)
    assert build_model(f"{path}:make", batch=2).example_inputs[0].shape == (2, 12, 8)
    assert build_model(f"{path}:make", batch=2, seq=5).example_inputs[0].shape == (2, 5, 8)


def test_factory_keeps_its_own_batch_default_when_no_batch_is_given(tmp_path):
    path = write(tmp_path, """
        def make(batch=4, seq=12):
            return Net(), torch.randn(batch, seq, 8)

        def needs_batch(batch):
            return Net(), torch.randn(batch, 8)

        def fixed():
            return Net(), torch.randn(3, 8)
        """)
    own = build_model(f"{path}:make")
    assert own.example_inputs[0].shape == (4, 12, 8) and (own.batch, own.seq) == (4, 12)
    assert build_model(f"{path}:make", batch=2).batch == 2
    assert build_model(f"{path}:needs_batch").batch == DEFAULT_BATCH  # no default of its own: the zoo's
    assert build_model(f"{path}:fixed").batch == 3  # read from its inputs
    with pytest.raises(ModelError, match="takes no batch argument, but batch 7 was asked for"):
        build_model(f"{path}:fixed", batch=7)  # not silently another batch than asked for
    assert build_model("mlp").batch == DEFAULT_BATCH


def test_factory_with_keyword_inputs_calls_the_model_with_them_by_name(tmp_path):
    # Hugging Face models take their inputs by name: model(input_ids=..., labels=...)
    path = write(tmp_path, """
        class Scored(nn.Module):
            def __init__(self):
                super().__init__()
                self.net = Net()

            def forward(self, features=None, target=None, scale=1.0):
                return ((self.net(features) - target) ** 2).mean() * scale

        def make(batch):
            return Scored(), {"target": torch.zeros(batch, 3), "features": torch.randn(batch, 8)}
        """)
    spec = build_model(f"{path}:make", batch=4)
    assert {name: x.shape for name, x in spec.example_inputs.items()} == {"target": (4, 3), "features": (4, 8)}
    features, target = spec.example_inputs["features"], spec.example_inputs["target"]
    expected = ((spec.model.net(features) - target) ** 2).mean()
    assert torch.allclose(training_loss(spec), expected) and spec.batch == 4


def test_factory_needing_other_arguments(tmp_path):
    path = write(tmp_path, "def make(batch, checkpoint_path):\n    return Net(), torch.randn(batch, 8)\n")
    with pytest.raises(ModelError) as error:
        build_model(f"{path}:make")
    assert_one_line_error(error, "checkpoint_path", "batch= and seq=")


def test_seq_for_a_factory_without_seq(tmp_path):
    path = write(tmp_path, "def make(batch):\n    return Net(), torch.randn(batch, 8)\n")
    with pytest.raises(ModelError) as error:
        build_model(f"{path}:make", seq=128)
    assert_one_line_error(error, "--seq 128", "no seq argument")


def test_file_without_a_factory_name(tmp_path):
    # the functions the file defines are named (it suggested `:make_model` whether or not the file had one)
    path = write(tmp_path, "def make():\n    return Net(), torch.randn(1, 8)\n\ndef _helper():\n    pass\n")
    for given in (path, f"{path}:"):
        with pytest.raises(ModelError) as error:
            build_model(given)
        assert_one_line_error(error, f"{path}:FACTORY (functions defined there: make)")


def test_count_parameters_counts_tied_weights_once():
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10, bias=False))
    model[1].weight = model[0].weight
    assert count_parameters(model) == 40
