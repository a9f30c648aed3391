"""`winslow viewer`: the viewer's mirror, its storage and its token put together, served by uvicorn."""
from __future__ import annotations

import argparse
import hashlib
import ipaddress
import logging
from pathlib import Path

from reconciler.commands.node import default_work
from reconciler.errors import ConfigError
from reconciler.sshstore import is_ssh_url
from reconciler.storage import Storage
from reconciler.transfer import storage_at
from viewer.app import create_app
from viewer.files import Files
from viewer.security import read_token
from viewer.source import Source

log = logging.getLogger("winslow.viewer")


def open_storage(flag: str | None, configured: str | None) -> Storage | None:
    """--storage, else winslow.yaml's storage.root, opened as the file verbs open it (a folder or mount, or
    ssh://[user@]host[:port]/path); None when neither names one."""
    if flag:
        return storage_at(flag)
    if not configured:
        return None
    if not is_ssh_url(configured) and not Path(configured).expanduser().is_dir():
        raise ConfigError(f"storage root {configured} (storage.root in winslow.yaml) is not a folder on this machine; "
                          f"reach it through a node with --storage ssh://NODE{configured}")
    return storage_at(configured)


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def run(args: argparse.Namespace) -> int:
    import uvicorn

    token = read_token(args.token_file) if args.token_file else None
    work = (args.work or default_work("viewer-" + hashlib.sha256(args.repo.encode()).hexdigest()[:10])).resolve()
    source = Source(args.repo, work, poll=args.poll)
    current = source.open()
    storage = open_storage(args.storage, current.snapshot.config.storage_root)
    files = Files(storage) if storage is not None else None
    if files is None:
        log.warning("no storage: pass --storage ROOT or set storage.root in winslow.yaml; files are not shown")
    else:
        try:
            files.check()  # a root that is not there says so now, not on the first files page
        except BaseException:
            files.close()
            raise
    if not _loopback(args.host) and token is None:
        log.warning("serving on %s without --token-file: anyone who reaches this port can read everything shown",
                    args.host)
    app = create_app(source, files, token)
    source.start()
    print(f"winslow viewer: http://{args.host}:{args.port}/  (main {current.main[:10]} of {args.repo}; "
          f"storage {files.root if files else 'none'}; mirror {work})", flush=True)
    try:
        # Open log streams end with the server: a stream waits for its run, which may take hours.
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False,
                    timeout_graceful_shutdown=3)
    finally:
        source.stop()
        if files is not None:
            files.close()
    return 0
