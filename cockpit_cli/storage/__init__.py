"""The run directory: the writer used during training and the reader used by every other command.

Nothing here imports torch.
"""
