"""Where everything lives: the state repo's files and refs, and the storage root's folders.

Every path and ref name Winslow reads or writes is spelled here once; the rest of
the code asks this module. Plain strings only: nothing here touches a disk.

State repo (main)::

    winslow.yaml                                cluster settings                users
    pipelines/<pipeline>.yaml                   pipeline definitions            users
    projects/<p>/project.yaml                   a project and its desired run   users
    projects/<p>/status.yaml                    observed state and runs         reconcilers
    projects/<p>/pipeline.lock.yaml             the pipeline a request locked   reconcilers
    projects/<p>/logs/<run>.log                 final, size-capped stage logs   reconcilers
    projects/<p>/results/<run>.yaml             result manifests                reconcilers
    images/<name>/Dockerfile (+ its context)    a stage image Winslow builds    users
    builds/<name>.yaml                          that image's builds and digests reconcilers
    builds/<name>/<source>.log                  a build's size-capped log       reconcilers

Other branches: `winslow/nodes/<node>` (`nodes/<node>.yaml` and `nodes/<node>.tick`,
written by that node only) and `resume/<p>/<request>` (a proposed commit that
continues a project waiting at a gate).

Storage root: `resources/` (the shared pool), `workspaces/<p>/<run>/` (what a run
leaves), `logs/<p>/<run>.log` (full stage logs), `logs/.builds/<name>/<source>.log` (full
build logs), `.winslow/leases/<node>` (until when a node's lease holds, for the supervisors
of its runs on other machines: a Slurm job's script).
"""
from __future__ import annotations

import posixpath
import re

# -- the state repo: files on main --------------------------------------------------------------
CONFIG = "winslow.yaml"
PIPELINES = "pipelines"
PROJECTS = "projects"
PROJECT_FILE = "project.yaml"
IMAGES = "images"
BUILDS = "builds"
_IMAGE_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")  # a registry repository's last part
STATUS_FILE = "status.yaml"
LOCK_FILE = "pipeline.lock.yaml"
LOGS = "logs"
RESULTS = "results"


def pipeline_file(name: str) -> str:
    return f"{PIPELINES}/{name}.yaml"


def project_dir(project: str) -> str:
    return f"{PROJECTS}/{project}"


def project_file(project: str) -> str:
    return f"{PROJECTS}/{project}/{PROJECT_FILE}"


def status_file(project: str) -> str:
    return f"{PROJECTS}/{project}/{STATUS_FILE}"


def lock_file(project: str) -> str:
    return f"{PROJECTS}/{project}/{LOCK_FILE}"


def log_file(project: str, run_id: str) -> str:
    """The capped log of a finished run, on main."""
    return f"{PROJECTS}/{project}/{LOGS}/{run_id}.log"


def result_file(project: str, run_id: str) -> str:
    """The result manifest of a finished run, on main."""
    return f"{PROJECTS}/{project}/{RESULTS}/{run_id}.yaml"


def project_of(path: str) -> str | None:
    """The project a state repo path belongs to (`projects/<p>/...`), or None."""
    parts = path.split("/")
    return parts[1] if len(parts) >= 3 and parts[0] == PROJECTS else None


def is_state_file(path: str, results: bool = False) -> bool:
    """A file the state reader looks at: winslow.yaml, the YAML files below pipelines/ and projects/, the build
    records in builds/, and every file of an image folder (images/NAME/...), whose ids make its content id.

    YAML in places Winslow never reads is listed too, so that the reader can say so.
    Result manifests only when `results` is asked for (the node never needs them to
    decide; `winslow validate` checks them). Logs are plain text and never read here.
    """
    if path == CONFIG:
        return True
    parts = path.split("/")
    if parts[0] == IMAGES:  # every file of an image folder: its content id is made of them
        return len(parts) >= 3
    if parts[0] == BUILDS:
        return len(parts) == 2 and path.endswith(".yaml")
    if parts[0] not in (PIPELINES, PROJECTS) or not path.endswith((".yaml", ".yml")):
        return False
    if parts[0] == PROJECTS and len(parts) >= 4 and parts[2] in (LOGS, RESULTS):
        return results and parts[2] == RESULTS
    return True


# -- the state repo: branches --------------------------------------------------------------------
MAIN = "main"
MAIN_REF = "refs/heads/main"
ORIGIN = "refs/remotes/origin/"
ORIGIN_MAIN = ORIGIN + MAIN
NODE_BRANCHES = "winslow/nodes/"
RESUME_BRANCHES = "resume/"
ORIGIN_NODES = ORIGIN + NODE_BRANCHES
ORIGIN_RESUMES = ORIGIN + RESUME_BRANCHES
MAIN_REFSPEC = f"+{MAIN_REF}:{ORIGIN_MAIN}"
NODES_REFSPEC = f"+refs/heads/{NODE_BRANCHES}*:{ORIGIN_NODES}*"
RESUMES_REFSPEC = f"+refs/heads/{RESUME_BRANCHES}*:{ORIGIN_RESUMES}*"
REFSPECS = (MAIN_REFSPEC, NODES_REFSPEC, RESUMES_REFSPEC)


def node_branch(node: str) -> str:
    return f"{NODE_BRANCHES}{node}"


def node_file(node: str) -> str:
    """The node's document on its own branch."""
    return f"nodes/{node}.yaml"


def node_tick(node: str) -> str:
    """The small file every heartbeat changes, so a beat costs a few bytes."""
    return f"nodes/{node}.tick"


def resume_prefix(project: str) -> str:
    return f"{RESUME_BRANCHES}{project}/"


def resume_branch(project: str, request: int) -> str:
    return f"{resume_prefix(project)}{request}"


def parse_resume_branch(branch: str) -> tuple[str, int | None] | None:
    """`resume/<p>/<n>` -> (p, n); n is None when it is not a number; None for any other name."""
    parts = branch.split("/")
    if len(parts) != 3 or parts[0] + "/" != RESUME_BRANCHES or not parts[1]:
        return None
    return parts[1], int(parts[2]) if parts[2].isdigit() else None


# -- the storage root ----------------------------------------------------------------------------
RESOURCES = "resources"
WORKSPACES = "workspaces"
STORAGE_LOGS = "logs"
STORAGE_FOLDERS = (RESOURCES, WORKSPACES, STORAGE_LOGS)
PROJECT_STORAGE = (WORKSPACES, STORAGE_LOGS)  # what belongs to one project, below each: <project>/


def workspace(project: str, run_id: str) -> str:
    """A run's workspace, relative to the storage root."""
    return f"{WORKSPACES}/{project}/{run_id}"


def workspace_prefix(project: str) -> str:
    return f"{WORKSPACES}/{project}/"


def storage_log(project: str, run_id: str) -> str:
    """A run's full log, relative to the storage root."""
    return f"{STORAGE_LOGS}/{project}/{run_id}.log"


STORAGE_OWN = ".winslow"  # Winslow's own records at the storage root: never a user's path


def storage_lease(node: str) -> str:
    """Until when a node's lease holds, relative to the storage root: for its runs' supervisors on other machines."""
    return f"{STORAGE_OWN}/leases/{node}"


SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def is_safe_id(name: str) -> bool:
    """A name that can be one folder of the repo or the storage: never `.`, `..`, `.git` or a path."""
    return bool(SAFE_ID.match(name)) and name not in (".", "..")


def escapes(path: str) -> bool:
    """True when a relative path would leave the folder it is relative to."""
    if not path or path.startswith("/") or "\\" in path or "\x00" in path:
        return True
    normal = posixpath.normpath(path)
    return normal == ".." or normal.startswith("../")


def in_workspaces_of(path: str, project: str) -> bool:
    """True when `path` (relative to the storage root) is inside the project's workspaces."""
    return not escapes(path) and posixpath.normpath(path).startswith(workspace_prefix(project))


# -- images Winslow builds ----------------------------------------------------------------------
def is_image_name(name: str) -> bool:
    return bool(_IMAGE_NAME.match(name))


def image_dir(name: str) -> str:
    return f"{IMAGES}/{name}"


def image_of(path: str) -> str | None:
    """`images/tracker/Dockerfile` -> `tracker`; None for a path outside an image folder."""
    parts = path.split("/")
    return parts[1] if len(parts) >= 3 and parts[0] == IMAGES else None


def build_file(name: str) -> str:
    return f"{BUILDS}/{name}.yaml"


def build_log(name: str, source: str) -> str:
    return f"{BUILDS}/{name}/{source[:16]}.log"


def build_log_path(name: str, source: str) -> str:
    """The full build log under the storage root."""
    return f"{LOGS}/.builds/{name}/{source[:16]}.log"
