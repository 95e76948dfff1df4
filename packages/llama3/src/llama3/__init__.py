"""llama3: the whole Llama 3 system ("The Llama 3 Herd of Models", arXiv 2407.21783) in one install.

Installing `llama3` installs every library of the workspace: llama-kernels, llama-model,
llama-data, llama-train and llama-serve. Import those by their own names (`llama_model`,
`llama_train`, ...): this package re-exports nothing. What it owns is `llama-demo`
(`llama3.demo`), the path from raw text to a trained, exported and reloaded model on one CPU,
which needs all of them and so cannot live in any one.
"""

__all__: list[str] = []
