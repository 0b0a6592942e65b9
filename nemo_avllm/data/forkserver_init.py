"""Imported only by the data workers' forkserver process (its preload list, `workers.worker_context`);
never import it anywhere else: it makes the importing process ignore SIGTERM.

SLURM (and `kill -TERM -<pgid>`) signals the whole process group. The forkserver is in that group;
if it died, every worker it forked would see its parent gone and quit, and the training process
would fail with "DataLoader worker exited unexpectedly" instead of writing its pre-emption
checkpoint. Ignoring SIGTERM here (workers inherit it) leaves the decision to the training
process; the forkserver still exits when the training process does (its alive pipe closes)."""

import signal

signal.signal(signal.SIGTERM, signal.SIG_IGN)
