"""Push a saved model folder to the Hugging Face Hub.

A push comes at the end of a pruning run that may have taken hours, so what can be checked locally (a model folder, a
token, offline mode) is checked before anything is sent, and what goes wrong on the wire becomes a `HubError` that says
what to do next. The folder is only read, never changed, so a failed push can simply be run again
(``hf-subprune push DIR REPO_ID``).
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["HubError", "check_can_push", "push_folder"]


class HubError(RuntimeError):
    """A push that cannot start or did not finish; the local folder is left as it was."""


def check_can_push(token: str | None = None) -> str:
    """The token to push with; raises `HubError`, without any network call, when there is none or the Hub is off."""
    from huggingface_hub import constants, get_token

    if constants.HF_HUB_OFFLINE:
        raise HubError("HF_HUB_OFFLINE is set (offline mode): unset it to push to the Hub")
    token = token or get_token()
    if not token:
        raise HubError("no Hugging Face token: log in with `hf auth login`, or set HF_TOKEN (or pass --token) "
                       "to a token with write access")
    return token


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Connection and timeout errors of the HTTP client this huggingface_hub uses (httpx2, httpx or requests)."""
    errors: list[type[BaseException]] = []
    try:
        import httpx2

        errors.append(httpx2.TransportError)
    except ImportError:
        pass
    try:
        import httpx

        errors.append(httpx.TransportError)
    except ImportError:
        pass
    try:
        import requests

        errors += [requests.ConnectionError, requests.Timeout]
    except ImportError:
        pass
    return tuple(errors)


def push_folder(folder: str | Path, repo_id: str, *, private: bool = False, revision: str | None = None,
                commit_message: str | None = None, token: str | None = None, create_pr: bool = False) -> str:
    """Upload every file of a model folder to ``repo_id`` in one commit; returns the commit (or pull request) URL.

    Args:
        private: visibility of the repo if this push creates it (an existing repo keeps its visibility).
        revision: branch to commit to, created from the default branch if it does not exist yet.
        create_pr: open a pull request against the default branch instead of committing to it.
    """
    folder = Path(folder)
    if not folder.is_dir() or not (folder / "config.json").is_file():
        raise HubError(f"{folder} is not a model folder (no config.json in it): push a folder written by "
                       "`hf-subprune prune --output DIR` or `PruneResult.save`")
    if create_pr and revision not in (None, "main"):
        raise HubError("a pull request is opened against the default branch: pass either a revision or create_pr")
    token = check_can_push(token)

    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision not in (None, "main") and not revision.startswith("refs/"):
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        info = api.upload_folder(repo_id=repo_id, folder_path=folder, revision=revision, create_pr=create_pr,
                                 commit_message=commit_message or f"Upload {folder.name} (pruned with hf_subprune)")
    except _transport_errors() as e:
        raise HubError(f"cannot reach the Hub at {api.endpoint} ({type(e).__name__}: {e}); check the network or "
                       f"HF_ENDPOINT and push again; the local folder {folder} is unchanged") from e
    except HfHubHTTPError as e:
        raise HubError(f"the Hub at {api.endpoint} refused the push to {repo_id}: {e}\n"
                       f"the local folder {folder} is unchanged") from e
    return str(info.pr_url or info.commit_url)
