"""Training language models from scratch: dense, Monarch from initialisation, or Monarch then
dense (the paper's sparse-to-dense switch). :mod:`.options` is torch-free; :mod:`.train` runs
``Trainer``; :mod:`.switch` is the switch; :mod:`.text` the data; :mod:`.build` the architecture."""
