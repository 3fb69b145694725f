"""Runs a PBS hook script as pbs_server would, with the STAND-IN ``pbs`` module (pbs.py here; no PBS
server was available): ``python run_hook.py EVENT.json HOOK.py``. EVENT.json describes the event:
``{"type": "runjob", "job": {...attributes...}, "server": "name", "hook_config": "path or null"}``,
and ``"home"``: the directory of the stand-in server (standin_server.py) the hook runs in, if any.

Prints one JSON object: ``accepted`` (the outcome PBS would act on), ``reject_message``, ``log`` (the
pbs.logmsg lines), ``unhandled`` (an exception that escaped the hook: PBS then rejects the action and
logs it), ``job`` (the job's attributes after the hook)."""

from __future__ import annotations

import json
import runpy
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import pbs  # the stand-in


def main(event_file: str, hook_file: str) -> int:
    description = json.loads(Path(event_file).read_text())
    pbs._server_name = description.get("server", "pbs-server")
    pbs.hook_config_filename = description.get("hook_config")
    pbs._home = Path(description["home"]) if description.get("home") else None
    the_job = pbs.job(dict(description["job"]))
    pbs._event = pbs.event_object(pbs.EVENT_TYPES[description["type"]], the_job)
    unhandled = None
    try:
        runpy.run_path(hook_file, run_name="__main__")
    except SystemExit:
        pass
    except Exception:  # PBS: "the action is rejected and an error message is printed to the daemon log"
        unhandled = traceback.format_exc()
        pbs._event.accepted = False
    accepted = pbs._event.accepted is not False
    job_after = {k: (v if isinstance(v, bool | int | float | str) or v is None else str(v))
                 for k, v in vars(the_job).items() if k != "Resource_List"}
    print(json.dumps({
        "accepted": accepted,
        "reject_message": pbs._event.reject_message,
        "log": pbs.log_lines,
        "unhandled": unhandled,
        "job": job_after,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
