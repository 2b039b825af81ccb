"""Ahead-of-time compile of the real train / serve steps for a target the host does not have.

TPU targets: libtpu's deviceless compiler (`jax.experimental.topologies`) gives the executable's memory
use and the compiler's cost figures. GPU / Trainium targets: an analytic roofline, labelled "modelled".
Entry points: `polychip.compile.run.compile_report(...)`, the `polychip compile` CLI (cli.py).

Owns: deviceless TPU compile of the real steps, the HLO walk, compile reports, the compile cache.
May import: files, yamlpos, config, hardware, data, kernels, parallel, model, train, estimate, plan, infer, serve (layer 7;
tests/test_layers.py).
"""
