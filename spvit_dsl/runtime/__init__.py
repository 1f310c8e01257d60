"""Runtime shared by the torch stages: datasets and loaders, devices, processes, evaluation."""
