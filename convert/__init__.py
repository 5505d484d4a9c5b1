"""`openelm_mlx.convert`: a checkpoint turned into other forms, and those forms run and checked.
The folder keeps its name (users were promised `convert/` at the top); what it holds:

- conversion: hf_to_mlx.py (`openelm convert`, Hugging Face or corenet -> an MLX model folder);
- export: package.py (the one PackageDescription), numerics.py (the float16 guard), compression.py,
  export.py (the flow both exporters share), export_cli.py (their shared options), and per format
  coreml/graph.py, coreml/export.py, coreai/graph.py, coreai/ios_graph.py, coreai/bundle.py,
  coreai/export.py;
- package runtimes, which `generate --backend`, `bench --backend` and the verify commands use:
  package_input.py (a package read back as input, every field checked), package_runner.py (the
  PackageRunner contract), runner.py (open_runner, open_bundle, PackageModel), and the runners
  themselves: coreml/swift_transformers.py over Core ML or coreml/executor.py (the numpy MIL
  executor), coreai/runtime.py, sequential_engine.py and static_engine.py over Apple's Core AI
  runtime (coreai/probe.py loads a program in a child process first);
- verification: verify.py, coreml/verify.py, coreai/verify.py, coreai/weights.py.

The runtimes live here rather than in the library because they read what the exporters write
(package.py's names, package_input.py) and need the optional extras; apps/ and benchmarks/ import
them from here (ARCHITECTURE.md)."""
