"""`unknown_name`: llama-data's "unknown ...; did you mean ...?" wording for names that are not keys.

`format_validation_error` itself is held to the workspace's one contract, with llama-model's twin,
in `tests/test_config_errors.py` at the root; what is tested here is llama-data's own addition.
"""

from __future__ import annotations

from llama_data._config_errors import unknown_name


def test_unknown_name_for_other_kinds() -> None:
    """The same wording serves unknown step types (valid names in the order given)."""
    assert unknown_name("gopher", ["pii", "gopher_quality"], "step type") == (
        "unknown step type; did you mean 'gopher_quality'? valid step types: pii, gopher_quality"
    )


def test_unknown_name_suggests_as_for_keys() -> None:
    """Names are suggested as keys are: a shared ``_``-word when no spelling is close, and no
    suggestion when nothing is (negative control)."""
    assert unknown_name("lr", ["peak_lr", "final_lr"]) == (
        "unknown key; did you mean 'peak_lr'? valid keys: peak_lr, final_lr"
    )
    assert unknown_name("bogus", ["peak_lr", "final_lr"]) == (
        "unknown key; valid keys: peak_lr, final_lr"
    )
