"""Imported only by the data workers' forkserver process (its preload list, `workers.worker_context`);
never import it anywhere else: it makes the importing process hold back SIGTERM.

SLURM (and `kill -TERM -<pgid>`) signals the whole process group. The forkserver is in that group;
if it died, every worker it forked would see its parent gone and quit, and the training process
would fail with "DataLoader worker exited unexpectedly" instead of writing its pre-emption
checkpoint. Blocking SIGTERM here (workers inherit the mask) leaves the decision to the training
process; the forkserver still exits when the training process does (its alive pipe closes).
Blocked, not ignored: a SIGTERM sent to a worker before it sets up its own handling
(`workers.loader_worker_init`, `workers.pool_worker_start`) stays pending instead of being lost,
so `Pool.terminate` / `Process.terminate` on a worker that is still starting cannot hang."""

import signal

signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
