import os

from deltatune.cli import main

if os.environ.get("TORCHELASTIC_ERROR_FILE"):
    # A rank started by torchrun: an uncaught exception goes to torchrun's failure summary (its error file),
    # so the launcher can name the rank and the cause. Imported only here: torch is slow to import.
    from torch.distributed.elastic.multiprocessing.errors import record

    main = record(main)

main()
