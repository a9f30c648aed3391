"""The verbs that add, change and remove projects and pipelines: `winslow project ...`, `winslow pipeline delete`.

Each is a shortcut for an edit a person could make by hand in their clone of the
state repo — write projects/<P>/project.yaml, change a key or a list in it keeping
their comments, remove a folder or a pipeline file — committed and pushed the way
every verb is (change.py: pull, check, commit, push, again on a rejected push).
"""
from __future__ import annotations

import argparse
import difflib
import sys
import textwrap
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from reconciler import layout
from reconciler.commands.change import Edit, check_project, commit_edit, load_lock, load_pipeline, project_problems
from reconciler.commands.clone import (
    Clone,
    add_verb,
    check_name,
    local_projects,
    no_project,
    open_clone,
    pull,
    require_main,
)
from reconciler.commands.verbs import _env_pairs as env_pairs
from reconciler.edit import add_items, remove_fields, remove_items, render, set_fields
from reconciler.errors import ConfigError, InvalidFile
from reconciler.model import ClusterConfig, Pipeline
from reconciler.units import format_duration
from reconciler.validation import is_safe_id, read_config, read_status, section
from reconciler.yamlsafe import parse_yaml

SCHEMA_LINE = "# yaml-language-server: $schema=../../schema/project.schema.json"
WIDTH = 78      # of --help descriptions, which keep their own line breaks so that examples do
SHOWN = 10      # names listed in one message before "..."


def add_parser(sub: argparse._SubParsersAction) -> None:
    project = _group(sub, "project", "create, rename, tag, re-point or delete a project",
                     "Shortcuts for edits of projects/<P>/ in the state repo, each committed and pushed from this "
                     "clone like `winslow start`.",
                     ["winslow project create ulm-0813 --pipeline tracking --tag ulm --env VIDEO=ulm/DJI_0002.MP4",
                      "winslow project delete ulm-0813 --yes"])
    verbs = project.add_subparsers(dest="verb", metavar="VERB")

    create = _verb(verbs, "create", "add projects/NAME/project.yaml (nothing runs until you start it)",
                   "Write projects/NAME/project.yaml naming pipeline P, with the tags, env and display name given and "
                   "`run: {request: 0, state: running}`, so nothing starts until `winslow start NAME`; commit and "
                   "push. Refused when the pipeline does not exist, when NAME is not a safe folder name (letters, "
                   "digits, '_', '.', '-'; at most 64) or when the project exists.",
                   ["winslow project create ulm-0813 --pipeline tracking --tag ulm --tag drone \\",
                    "    --env VIDEO=ulm/DJI_0002.MP4 --display-name 'Ulm intersection 2019-08-13'",
                    "winslow start ulm-0813"], run_create)
    create.add_argument("name", metavar="NAME", help="the project's id: its folder under projects/")
    create.add_argument("--pipeline", required=True, metavar="P", help="the pipeline it runs: pipelines/P.yaml")
    create.add_argument("--tag", action="append", default=[], metavar="T", help="a tag (repeatable)")
    create.add_argument("--env", action="append", default=[], metavar="K=V",
                        help="a variable for every stage (repeatable)")
    create.add_argument("--display-name", metavar="TEXT", help="the name shown for it (default: NAME)")

    rename = _verb(verbs, "rename", "change a project's display name (its folder and history stay)",
                   "Set `name:` in projects/NAME/project.yaml, commit and push. The id (the folder name), its runs "
                   "and its history stay as they are.",
                   ["winslow project rename ulm-0813 --display-name 'Ulm, second day'"], run_rename)
    rename.add_argument("name", metavar="NAME", help="the project's id")
    rename.add_argument("--display-name", required=True, metavar="TEXT", help="the new display name")

    tag = _verb(verbs, "tag", "add tags to a project",
                "Add the tags to `tags:` in projects/NAME/project.yaml (those it has stay once), commit and push.",
                ["winslow project tag ulm-0813 night rain"], run_tag)
    tag.add_argument("name", metavar="NAME", help="the project's id")
    tag.add_argument("tags", nargs="+", metavar="TAG", help="letters, digits, '_', '.', '-'")

    untag = _verb(verbs, "untag", "remove tags from a project",
                  "Remove the tags from `tags:` in projects/NAME/project.yaml, commit and push; says which of them "
                  "the project did not have.",
                  ["winslow project untag ulm-0813 rain"], run_untag)
    untag.add_argument("name", metavar="NAME", help="the project's id")
    untag.add_argument("tags", nargs="+", metavar="TAG")

    repoint = _verb(verbs, "set-pipeline", "make a project run another pipeline, from its next request",
                    "Set `pipeline:` in projects/NAME/project.yaml, commit and push. A request that has begun goes on "
                    "with the pipeline it locked (projects/NAME/pipeline.lock.yaml); P applies from the next request. "
                    "run.from and run.until are removed when P has no such stage.",
                    ["winslow project set-pipeline ulm-0813 tracking-v2",
                     "winslow start ulm-0813            # a new request, on tracking-v2"], run_set_pipeline)
    repoint.add_argument("name", metavar="NAME", help="the project's id")
    repoint.add_argument("pipeline", metavar="P", help="the pipeline: pipelines/P.yaml")

    delete = _verb(verbs, "delete", "remove a project's folder from git; nodes then free its storage",
                   "Remove projects/NAME/ from git — project.yaml and every file the nodes wrote there — commit and "
                   "push. Nodes stop its running runs, and remove exactly its workspaces and logs from storage "
                   "(workspaces/NAME/, logs/NAME/) once `timeouts.cleanup` (winslow.yaml) has passed after they saw "
                   "the deletion. Asks first on a terminal; needs --yes otherwise.",
                   ["winslow project delete ulm-0813", "winslow project delete ulm-0813 --yes   # in a script"],
                   run_delete)
    delete.add_argument("name", metavar="NAME", help="the project's id")
    delete.add_argument("--yes", action="store_true", help="do not ask (required when stdin is not a terminal)")

    pipeline = _group(sub, "pipeline", "delete a pipeline",
                      "Shortcuts for edits of pipelines/ in the state repo, committed and pushed from this clone.",
                      ["winslow pipeline delete tracking-old"])
    pipeline_verbs = pipeline.add_subparsers(dest="verb", metavar="VERB")
    remove = _verb(pipeline_verbs, "delete", "remove pipelines/P.yaml (refused while projects name it)",
                   "Remove pipelines/P.yaml, commit and push. Refused, with the list of them, while a project.yaml "
                   "names P, unless --force. A request that has begun goes on with its locked copy either way "
                   "(projects/<P>/pipeline.lock.yaml); a project that never locked it is INVALID until it names "
                   "another pipeline.",
                   ["winslow pipeline delete tracking-old",
                    "winslow pipeline delete tracking-old --force   # projects still name it"], run_pipeline_delete)
    remove.add_argument("pipeline", metavar="P", help="the pipeline: pipelines/P.yaml")
    remove.add_argument("--force", action="store_true", help="delete it although projects name it")


def _group(sub: argparse._SubParsersAction, name: str, help: str, description: str,
           examples: Sequence[str]) -> argparse.ArgumentParser:
    parser = sub.add_parser(name, help=help, description=textwrap.fill(description, WIDTH),
                            epilog=_examples(examples), formatter_class=argparse.RawDescriptionHelpFormatter)

    def usage(args: argparse.Namespace) -> int:
        parser.print_help(sys.stderr)
        return 2

    parser.set_defaults(func=usage)
    return parser


def _verb(sub: argparse._SubParsersAction, name: str, help: str, description: str, examples: Sequence[str],
          func: Callable[[argparse.Namespace], int]) -> argparse.ArgumentParser:
    parser = add_verb(sub, name, help, textwrap.fill(description, WIDTH), func)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = _examples(examples)
    return parser


def _examples(lines: Sequence[str]) -> str:
    return ("example:\n" if len(lines) == 1 else "examples:\n") + "\n".join(f"  {line}" for line in lines)


def _listed(names: Sequence[str]) -> str:
    return ", ".join(names[:SHOWN]) + (f", ... ({len(names) - SHOWN} more)" if len(names) > SHOWN else "")


# --- reading the clone ---------------------------------------------------------------------------

def _read(root: Path, project: str) -> tuple[str, dict[str, Any]]:
    """project.yaml's text and its data; the one-line error for a missing project."""
    rel = layout.project_file(project)
    path = root / rel
    if not path.is_file():
        raise no_project(project, local_projects(root))
    text = path.read_bytes().decode("utf-8")
    data = parse_yaml(text.encode("utf-8"), rel).data
    return text, data if isinstance(data, dict) else {}


def _pipelines(root: Path) -> list[str]:
    base = root / layout.PIPELINES
    return sorted(p.stem for p in base.glob("*.yaml")) if base.is_dir() else []


def _has_pipeline(root: Path, name: str) -> bool:
    return is_safe_id(name) and (root / layout.pipeline_file(name)).is_file()


def _no_pipeline(root: Path, name: str) -> ConfigError:
    known = _pipelines(root)
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}?" if close else f"known: {_listed(known) or 'none'}"
    return ConfigError(f"no pipeline '{name}': {layout.pipeline_file(name)} does not exist ({hint})")


def _require_pipeline(root: Path, name: str) -> Pipeline:
    """pipelines/<name>.yaml as the model; a one-line error when it is missing or invalid."""
    if not _has_pipeline(root, name):
        raise _no_pipeline(root, name)
    pipeline = load_pipeline(root, name)
    if pipeline is None:
        raise ConfigError(f"pipeline '{name}' is invalid; `winslow validate` says why")
    return pipeline


def _request(data: Mapping[str, Any]) -> int:
    value = section(data, "run").get("request", 0)
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _tracked(clone: Clone, folder: str) -> list[str]:
    return clone.git("ls-files", "-z", "--", folder).split("\0")[:-1]


def _check_tags(tags: Sequence[str]) -> list[str]:
    for tag in tags:
        if not is_safe_id(tag):
            raise ConfigError(f"'{tag}' is not a tag (letters, digits, '_', '.', '-'; at most 64)")
    return list(dict.fromkeys(tags))


# --- create --------------------------------------------------------------------------------------

def _aligned(lines: Sequence[tuple[str, str]]) -> list[str]:
    """YAML lines with their comments in one column."""
    column = max(len(code) for code, _ in lines) + 2
    return [f"{code:<{column}}# {comment}" if comment else code for code, comment in lines]


def new_project(project: str, pipeline: Pipeline, tags: Sequence[str], env: Mapping[str, str],
                display_name: str | None) -> str:
    """project.yaml of a new project, written like the template's example: nothing runs until request 1."""
    first, last = pipeline.stage_names[0], pipeline.stage_names[-1]
    head = [(f"name: {render(display_name or project)}", "the name shown for it; the folder name is its id"),
            (f"pipeline: {render(pipeline.name)}", "a file in pipelines/, without .yaml"),
            (f"tags: {render(list(tags))}", "for finding projects in the viewer"),
            ("env:" if env else "env: {}", "given to every stage; wins over the pipeline's env")]
    head += [(f"  {render(k)}: {render(v)}", "") for k, v in env.items()]
    run = [("  request: 0", "bump it to ask for a new execution; 0 means it has never been started"),
           (f"  # from: {first}", "the stage a new request starts at (default: the pipeline's first)"),
           (f"  # until: {last}", "the last stage to run (default: the last of the pipeline)"),
           ("  # step: true", "pause after every stage for approval, as if each had pause_after"),
           ("  state: running", "running | paused | aborted")]
    return "\n".join([
        SCHEMA_LINE,
        "#",
        "# A project: one input and the pipeline that processes it. The folder name",
        f"# ({project}) is the project's id; you own this file, the reconcilers write",
        "# everything else in this folder.",
        *_aligned(head),
        "",
        "# What you want to happen. Nothing runs until you start it: set `request: 1`",
        f"# and push, or run `winslow start {project}`.",
        "run:",
        *_aligned(run),
        "",
    ])


def run_create(args: argparse.Namespace) -> int:
    project = args.name
    check_name(project)
    tags = _check_tags(args.tag)
    env = env_pairs(args.env)
    if args.display_name is not None and not args.display_name.strip():
        raise ConfigError("--display-name must not be empty")
    clone = open_clone(args.repo_dir)
    folder, rel = layout.project_dir(project), layout.project_file(project)

    def plan(root: Path) -> Edit:
        if (root / rel).is_file():
            raise ConfigError(f"project '{project}' already exists ({rel}); change it with `winslow project "
                              f"rename|tag|set-pipeline`, or pick another name")
        left = _tracked(clone, folder)
        if left:  # the nodes' record of a deleted project's last runs: a new project would inherit its requests
            raise ConfigError(f"{folder}/ still holds {len(left)} file{'s' if len(left) > 1 else ''} of a deleted "
                              f"project ({_listed([p[len(folder) + 1:] for p in left])}); remove them first: "
                              f"winslow project delete {project}")
        pipeline = _require_pipeline(root, args.pipeline)
        text = new_project(project, pipeline, tags, env, args.display_name)
        check_project(root, project, text)
        details = [f"tags {', '.join(tags)}"] if tags else []
        details += [f"env {' '.join(f'{k}={v}' for k, v in env.items())}"] if env else []
        message = f"{project}: create on pipeline {pipeline.name}" + "".join(f"; {d}" for d in details)
        notes = (f"nothing runs until you start it: winslow start {project}", *_recently_deleted(clone, project))
        return Edit(message, {rel: text}, notes=notes)

    commit_edit(clone, [folder], plan)
    return 0


# --- rename, tag, untag, set-pipeline ------------------------------------------------------------

def _edit_project(args: argparse.Namespace, plan: Callable[[Path, str, dict[str, Any]], Edit | str]) -> int:
    project = args.name
    check_name(project)
    rel = layout.project_file(project)

    def edit(root: Path) -> Edit | str:
        text, data = _read(root, project)
        return plan(root, text, data)

    commit_edit(open_clone(args.repo_dir), [rel], edit)
    return 0


def run_rename(args: argparse.Namespace) -> int:
    project, display_name = args.name, args.display_name
    if not display_name.strip():
        raise ConfigError("--display-name must not be empty")

    def plan(root: Path, text: str, data: dict[str, Any]) -> Edit | str:
        if data.get("name") == display_name:
            return f'{project}: already named "{display_name}"; nothing to change'
        edited = set_fields(text, (), {"name": display_name})
        check_project(root, project, edited)
        return Edit(f'{project}: rename to "{display_name}"', {layout.project_file(project): edited})

    return _edit_project(args, plan)


def _tags_of(data: Mapping[str, Any]) -> list[Any]:
    tags = data.get("tags")
    return tags if isinstance(tags, list) else []


def run_tag(args: argparse.Namespace) -> int:
    project, tags = args.name, _check_tags(args.tags)

    def plan(root: Path, text: str, data: dict[str, Any]) -> Edit | str:
        new = [t for t in tags if t not in _tags_of(data)]
        if not new:
            return f"{project}: already tagged {', '.join(tags)}; nothing to change"
        edited = add_items(text, ("tags",), new)
        check_project(root, project, edited)
        return Edit(f"{project}: tag {', '.join(new)}", {layout.project_file(project): edited})

    return _edit_project(args, plan)


def run_untag(args: argparse.Namespace) -> int:
    project, tags = args.name, list(dict.fromkeys(args.tags))

    def plan(root: Path, text: str, data: dict[str, Any]) -> Edit | str:
        present = [t for t in tags if t in _tags_of(data)]
        missing = [t for t in tags if t not in present]
        if not present:
            return f"{project}: not tagged {', '.join(missing)}; nothing to change"
        edited = remove_items(text, ("tags",), present)
        check_project(root, project, edited)
        notes = (f"{project} was not tagged {', '.join(missing)}",) if missing else ()
        return Edit(f"{project}: untag {', '.join(present)}", {layout.project_file(project): edited}, notes=notes)

    return _edit_project(args, plan)


def run_set_pipeline(args: argparse.Namespace) -> int:
    project, name = args.name, args.pipeline

    def plan(root: Path, text: str, data: dict[str, Any]) -> Edit | str:
        pipeline = _require_pipeline(root, name)
        old = data.get("pipeline")
        if old == name:
            return f"{project}: already on pipeline {name}; nothing to change"
        edited = set_fields(text, (), {"pipeline": name})
        run = section(data, "run")
        stale = [k for k in ("from", "until") if isinstance(run.get(k), str) and run[k] not in pipeline.stage_names]
        if stale:
            edited = remove_fields(edited, ("run",), stale)
        check_project(root, project, edited)
        request = _request(data)
        lock_request, lock = load_lock(root, project)
        if lock is not None and request and request == lock_request:
            now = (f"request {request} goes on with the pipeline it locked ({lock.name}, in "
                   f"{layout.lock_file(project)}); {name} applies from the next request: winslow start {project}")
        elif request:
            now = f"request {request} has not begun yet, so it runs on {name}"
        else:
            now = f"{name} applies from its first request: winslow start {project}"
        notes = [now] + [f"run.{k} '{run[k]}' removed: {name} has no such stage "
                         f"(stages: {', '.join(pipeline.stage_names)})" for k in stale]
        was = f" (was {old})" if isinstance(old, str) else ""
        return Edit(f"{project}: set pipeline {name}{was}, from the next request",
                    {layout.project_file(project): edited}, notes=tuple(notes))

    return _edit_project(args, plan)


# --- delete --------------------------------------------------------------------------------------

def _cleanup_grace(root: Path) -> tuple[float, str]:
    """timeouts.cleanup in seconds and as winslow.yaml in the clone writes it; the default when it is missing
    or invalid."""
    try:
        doc = parse_yaml((root / layout.CONFIG).read_bytes(), layout.CONFIG)
        config, _ = read_config(doc)
    except (OSError, InvalidFile):
        config = None
    if config is None:
        default = ClusterConfig().cleanup
        return default, format_duration(default)
    written = section(doc.data, "timeouts").get("cleanup")
    return config.cleanup, written if isinstance(written, str) else format_duration(config.cleanup)


def _recently_deleted(clone: Clone, project: str) -> list[str]:
    """A warning when a project of this name was deleted less than the cleanup grace ago: the nodes keep its
    workspaces until the grace has passed, and a new project of the same name would find them."""
    deleted = clone.git("log", "-1", "--format=%ct", "--diff-filter=D", "--", layout.project_file(project)).strip()
    if not deleted:
        return []
    grace, written = _cleanup_grace(clone.root)
    ago = time.time() - int(deleted)
    if ago >= grace:
        return []
    storage = " and ".join(f"{top}/{project}/" for top in layout.PROJECT_STORAGE)
    return [f"warning: a project {project} was deleted {format_duration(ago)} ago, and the nodes remove its {storage} "
            f"only {written} after they saw that: its new runs may find the old one's files until then"]


def _running(root: Path, project: str) -> list[str]:
    """The runs status.yaml in the clone says are RUNNING."""
    rel = layout.status_file(project)
    try:
        status, _ = read_status(parse_yaml((root / rel).read_bytes(), rel), project)
    except (OSError, InvalidFile):
        return []
    return [run.id for run in status.active] if status else []


def _consequences(root: Path, project: str) -> list[str]:
    storage = " and ".join(f"{top}/{project}/" for top in layout.PROJECT_STORAGE)
    running = _running(root, project)
    lines = [f"its running run{'s' if len(running) > 1 else ''} {', '.join(running)} will be stopped"] if running else []
    return lines + [f"the nodes remove {storage} from storage {_cleanup_grace(root)[1]} after they see this "
                    f"(timeouts.cleanup in {layout.CONFIG}); nothing else in storage is touched"]


def _confirm(question: str) -> bool:
    try:
        answer = input(f"{question} [y/N] ")
    except EOFError:
        return False
    return answer.strip().lower() in ("y", "yes")


def run_delete(args: argparse.Namespace) -> int:
    project = args.name
    check_name(project)
    if not args.yes and not sys.stdin.isatty():
        raise ConfigError(f"deleting {project} needs --yes when stdin is not a terminal; nothing was deleted")
    clone = open_clone(args.repo_dir)
    folder = layout.project_dir(project)
    if not args.yes:
        require_main(clone)
        pull(clone)
        files = _tracked(clone, folder)
        if not files:
            raise no_project(project, local_projects(clone.root))
        print(f"This removes {folder}/ ({len(files)} file{'s' if len(files) > 1 else ''}) from git;")
        for line in _consequences(clone.root, project):
            print(f"  {line}")
        if not _confirm(f"Delete project {project}?"):
            raise ConfigError("nothing was deleted")

    def plan(root: Path) -> Edit:
        files = _tracked(clone, folder)
        if not files:
            raise no_project(project, local_projects(root))
        consequences = _consequences(root, project)
        effects = "; ".join(consequences)
        body = f"Removes {folder}/ ({len(files)} file{'s' if len(files) > 1 else ''}). {effects[0].upper()}{effects[1:]}."
        return Edit(f"{project}: delete the project", {folder: None}, body=textwrap.fill(body, 72),
                    notes=tuple(consequences))

    commit_edit(clone, [folder], plan)
    return 0


# --- pipeline delete -----------------------------------------------------------------------------

def _users(root: Path, pipeline: str) -> list[tuple[str, str]]:
    """(project, project.yaml's text) of every project whose project.yaml names `pipeline`."""
    users = []
    for project in sorted(local_projects(root)):
        try:
            text, data = _read(root, project)
        except (ConfigError, UnicodeDecodeError):
            continue  # unreadable: it names no pipeline we could tell
        if data.get("pipeline") == pipeline:
            users.append((project, text))
    return users


def run_pipeline_delete(args: argparse.Namespace) -> int:
    name = args.pipeline
    rel = layout.pipeline_file(name)

    def plan(root: Path) -> Edit:
        if not _has_pipeline(root, name):
            raise _no_pipeline(root, name)
        users = _users(root, name)
        names = [project for project, _ in users]
        if users and not args.force:
            raise ConfigError(f"pipeline '{name}' is used by {len(users)} project{'s' if len(users) > 1 else ''}: "
                              f"{_listed(names)}; point them at another (winslow project set-pipeline PROJECT P) "
                              f"or delete it anyway with --force")
        notes = []
        for project, text in users:
            if project_problems(root, project, text, gone={name}):
                notes.append(f"{project}: INVALID until it names another pipeline: "
                             f"winslow project set-pipeline {project} P")
            else:
                notes.append(f"{project}: its request goes on with its locked copy ({layout.lock_file(project)}); "
                             f"a new request needs another pipeline: winslow project set-pipeline {project} P")
        named = f" (still named by {_listed(names)})" if names else ""
        return Edit(f"Delete pipeline {name}{named}", {rel: None}, notes=tuple(notes))

    commit_edit(open_clone(args.repo_dir), [rel], plan)
    return 0
