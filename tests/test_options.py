"""The upscaling options are declared once (fastsr.pipeline.options.UpscaleOptions): the CLI, the
three upscale functions and the resume header take or derive from them, with one set of defaults."""

import argparse
import dataclasses
import inspect

import numpy as np
import pytest
import torch

import fastsr
from fastsr.commands import upscale as upscale_command
from fastsr.commands.options import options_from
from fastsr.errors import UserError
from fastsr.pipeline import options as options_mod
from fastsr.pipeline import upscale_file, upscale_folder, upscale_image
from fastsr.pipeline.options import HEADER_FIELDS, UpscaleOptions


def _cli(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    upscale_command.add_arguments(parser)
    return parser.parse_args(["in.png", "out.png", *argv])


def test_the_cli_defaults_are_the_api_defaults():
    assert options_from(_cli(), UpscaleOptions, UserError) == UpscaleOptions()


def test_every_option_is_a_cli_flag_once():
    parser = argparse.ArgumentParser()
    upscale_command.add_arguments(parser)
    dests = [a.dest for a in parser._actions if a.option_strings and a.dest != "help"]  # argparse's own list
    assert sorted(dests) == sorted([*(f.name for f in dataclasses.fields(UpscaleOptions)), "model"])


@pytest.mark.parametrize(("argv", "field", "value"), [
    (["--tile", "256"], "tile", 256), (["--halo", "12"], "halo", 12), (["--quiet"], "progress", False),
    (["--format", "tif"], "fmt", "tif"), (["--dtype", "bf16"], "dtype", "bf16"), (["--pyramid"], "pyramid", True),
])
def test_cli_flags_set_their_fields(argv, field, value):
    assert getattr(options_from(_cli(*argv), UpscaleOptions, UserError), field) == value


@pytest.mark.parametrize(("argv", "message"), [
    (["--tile", "0"], "--tile must be at least 1, got 0"),
    (["--batch-size", "-2"], "--batch-size must be at least 1, got -2"),
])
def test_cli_bounds_name_the_flag(argv, message):
    with pytest.raises(UserError, match=message):
        options_from(_cli(*argv), UpscaleOptions, UserError)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"tile": 0}, "tile must be at least 1, got 0"),
    ({"tile": 2.5}, "tile must be a positive number of pixels"),
    ({"tile": True}, "tile must be a positive number of pixels"),
    ({"batch_size": 0}, "batch_size must be at least 1, got 0"),
    ({"border": "wrap"}, "border must be one of mirror, reflect, zero"),
    ({"compression": "lzw"}, "compression must be one of"),
    ({"fmt": "gif"}, "fmt must be one of"),
    ({"dtype": torch.float64}, "unsupported compute dtype"),
    ({"dtype": "fp8"}, "dtype must be one of fp32, fp16, bf16"),
    ({"backend": "cuda"}, "backend must be one of"),
])
def test_api_values_are_checked_when_made(kwargs, message):
    with pytest.raises(fastsr.pipeline.UpscaleError, match=message):
        UpscaleOptions(**kwargs)


@pytest.mark.parametrize(("given", "name"), [(torch.float16, "fp16"), ("bfloat16", "bf16"), (None, "fp32"),
                                             (torch.float32, "fp32")])
def test_dtypes_are_held_by_name(given, name):
    assert UpscaleOptions(dtype=given).dtype == name


def test_numpy_integers_are_tiles():
    assert UpscaleOptions(tile=np.int64(256)).tile == 256


@pytest.mark.parametrize(("function", "name", "owner"), [
    (upscale_image, "compression", "upscale_file"), (upscale_image, "overwrite", "upscale_folder"),
    (upscale_file, "fmt", "upscale_folder"), (upscale_file, "tiles", None),
])
def test_a_keyword_the_function_does_not_take_is_a_type_error(tmp_path, function, name, owner):
    args = (np.zeros((8, 8, 3), np.uint8),) if function is upscale_image else (tmp_path / "a.png", tmp_path / "b.png")
    with pytest.raises(TypeError, match=f"{function.__name__}\\(\\) got an unexpected keyword argument '{name}'") as e:
        function(*args, **{name: 1})
    assert (owner in str(e.value)) if owner else "no option" in str(e.value)


def test_keywords_change_an_options_object():
    base = UpscaleOptions(tile=128, border="zero")
    changed = UpscaleOptions.of("upscale_file", base, tile=64)
    assert (changed.tile, changed.border, base.tile) == (64, "zero", 128)


def test_the_functions_take_no_option_of_their_own():
    """Each function's signature is (inputs, model, options, **changes): nothing restated."""
    for function in (upscale_file, upscale_folder, upscale_image, fastsr.upscale):
        params = list(inspect.signature(function).parameters.values())
        assert [p.name for p in params[-3:]] == ["model", "options", "changes"], function.__name__


def test_an_options_object_upscales_like_keywords():
    image = np.random.default_rng(0).integers(0, 256, (20, 24, 3), dtype=np.uint8)
    opts = UpscaleOptions(tile=16, border="zero", backend="torch")
    by_object = upscale_image(image, None, opts)
    by_keywords = upscale_image(image, tile=16, border="zero", backend="torch")
    np.testing.assert_array_equal(by_object, by_keywords)


def test_the_resume_header_holds_the_options_that_shape_the_output():
    names = {f.name for f in dataclasses.fields(UpscaleOptions)}
    assert set(HEADER_FIELDS) <= names
    header = UpscaleOptions(border="reflect").header({"tile": 500, "halo": 40, "batch_size": 1,
                                                      "dtype": "torch.float32", "device": "cpu", "backend": "cpp"})
    assert header == {"tile": 500, "halo": 40, "border": "reflect", "batch_size": 1, "dtype": "torch.float32",
                      "device": "cpu", "backend": "cpp"}


def test_batch_size_defaults_by_device():
    assert UpscaleOptions().batch_for(torch.device("cpu")) == 1
    assert UpscaleOptions().batch_for(torch.device("cuda")) == 4
    assert UpscaleOptions(batch_size=3).batch_for(torch.device("cuda")) == 3


def test_uses_names_only_real_functions():
    known = {"upscale_file", "upscale_folder", "upscale_image"}
    for field in dataclasses.fields(UpscaleOptions):
        assert field.metadata["uses"] is None or field.metadata["uses"] <= known, field.name
    assert options_mod.AUTO_TILE == UpscaleOptions().tile
