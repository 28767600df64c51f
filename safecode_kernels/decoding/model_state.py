"""Leave the user's model as it was found: the attributes a decoding run rebinds are put back.

The decoder drives the model with its own rows, positions and caches, and some of that state
lives on the model's modules (Qwen-VL's ``rope_deltas`` on ``model.model``, kept in step with
the decoder's rows by the adapter). Left behind, it would describe the decoder's last batch, not
the user's. :func:`model_state_kept` snapshots the attributes of every module (``vars()``: plain
attributes, not parameters, buffers or submodules, whose containers are not replaced) and
rebinds each one that the run rebound or deleted, also when the run raises.

Attributes a run *adds* stay: on first use transformers itself marks hooks it installed
(``_output_capturing_hooks_installed`` on a vision tower); removing the mark would install the
hooks twice. A plain forward of the user's adds the same ones.
"""

from __future__ import annotations

import contextlib

_MISSING = object()


@contextlib.contextmanager
def model_state_kept(model):
    """Within the context the model's modules may change their attributes; on exit (also after
    an error) every attribute that existed on entry is bound to its entry value again.

    Costs one shallow copy of each module's ``__dict__`` (about a millisecond for a 7B model's
    ~1000 modules)."""
    saved = [(module, dict(vars(module))) for module in model.modules()]
    try:
        yield
    finally:
        for module, before in saved:
            now = vars(module)
            for name, value in before.items():
                if now.get(name, _MISSING) is not value:
                    now[name] = value
