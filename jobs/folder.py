"""A job folder's layout, in one place (CONTRACT §2: `jobs/NAME/` holds everything of one
job). Every name in a job folder is defined here and used from here; nothing else spells
them.

    NAME.toml        the accepted job file, as the user wrote it (any job-file suffix)
    spec.json        its spec as resolved: defaults filled in, paths absolute
    state.json       the job's state (queued, running, done...), written atomically
    lock             held (flock) by the one process training the job
    log              the run's log, appended; durable up to each acknowledged save
    metrics.jsonl    one JSON record per step, epoch and save, appended likewise
    tensorboard/     TensorBoard event files, where tensorboard is installed
    threads.json     the CPU thread count fixed at the job's first start
    requests/        control requests (pause, cancel, quicksave, reload), one file each
    load.json        a "load game" request: the save the next run starts from
    saves/           the checkpoint store, one folder per save (store/)
    worker.out       the daemon's worker's stdout and stderr
    worker.error     why the last worker ended, for the daemon to read
"""

SPEC_FILE = "spec.json"
STATE_FILE = "state.json"
LOCK_FILE = "lock"
LOG_FILE = "log"
METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
THREADS_FILE = "threads.json"
REQUESTS = "requests"
LOAD_REQUEST = "load.json"
SAVES = "saves"
WORKER_OUT = "worker.out"
WORKER_ERROR = "worker.error"

