"""The serving model every engine runs: the replay's configuration
(:mod:`.config`), the router's ledger (:mod:`.ledger`), a prefill instance
(:mod:`.prefill`), a decode instance (:mod:`.decode`) and decision timing
(:mod:`.timing`).  Kept import-light: a worker process imports
:mod:`.prefill` or :mod:`.decode` alone (no numpy)."""
