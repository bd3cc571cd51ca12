"""llmjax.io.hub: --hf takes a local folder as it is, or a hub id fetched through huggingface_hub; every way that
fails is one line naming the local-folder alternative. No test touches the network."""

import socket
import sys

import pytest

from llmjax.io.hub import HubError, parse_hub_id, resolve_hf_folder

LOCAL_ALTERNATIVE = "download it elsewhere and pass the local folder: --hf /path/to/folder (config.json + *.safetensors)"


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any connection attempt fails the test at once, instead of hanging on a machine without internet."""
    def refuse(*args, **kwargs):
        raise AssertionError("a test of llmjax.io.hub tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture
def hub(monkeypatch):
    """huggingface_hub with snapshot_download faked: returns the calls and lets a test set what each call does."""
    import huggingface_hub

    calls = []
    answers = {}  # local_files_only -> a folder to return or an exception to raise

    def snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        answer = answers[kwargs["local_files_only"]]
        if isinstance(answer, BaseException):
            raise answer
        return str(answer)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return calls, answers


def not_cached():
    from huggingface_hub.errors import LocalEntryNotFoundError

    return LocalEntryNotFoundError("Cannot find an appropriate cached snapshot folder for the specified revision")


def test_a_local_folder_passes_through(tmp_path, monkeypatch, hub):
    calls, _ = hub
    assert resolve_hf_folder(tmp_path) == tmp_path and resolve_hf_folder(str(tmp_path)) == tmp_path
    (tmp_path / "owner" / "name").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert resolve_hf_folder("owner/name").resolve() == tmp_path / "owner" / "name"  # a local folder wins over the hub
    monkeypatch.setenv("HOME", str(tmp_path))
    assert resolve_hf_folder("~/owner/name") == tmp_path / "owner" / "name"
    assert calls == []


@pytest.mark.parametrize("name,parsed", [
    ("HuggingFaceTB/SmolLM2-135M", ("HuggingFaceTB/SmolLM2-135M", None)),
    ("meta-llama/Llama-3.2-1B@main", ("meta-llama/Llama-3.2-1B", "main")),
    ("owner/name@refs/pr/1", ("owner/name", "refs/pr/1")),
    ("gpt2", None), ("./owner/name", None), ("/models/llama", None), ("~/llama", None), ("a/b/c", None),
    ("owner/../name", None), (".hidden/name", None), ("owner/name@", None),
])
def test_what_is_a_hub_id(name, parsed, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert parse_hub_id(name) == parsed


@pytest.mark.parametrize("name", ["/nonexistent/llama", "./missing", "gpt2", "runs/typo", "~/missing/model/folder"])
def test_a_missing_local_path_is_no_such_folder(name, tmp_path, monkeypatch, hub):
    """Path-like names and names under an existing local folder (runs/) are never looked up on the hub."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    with pytest.raises(HubError, match=r"^no such folder: ") as error:
        resolve_hf_folder(name)
    assert "owner/name" in str(error.value) and "\n" not in str(error.value)
    assert hub[0] == []


def test_a_file_is_not_a_folder(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(HubError, match="is a file, not a folder"):
        resolve_hf_folder(tmp_path / "config.json")


def test_offline_with_an_empty_cache_is_one_clear_error(tmp_path, monkeypatch):
    """HF_HUB_OFFLINE=1 and an empty HF_HOME: the real snapshot_download finds nothing in the cache, and nothing is
    asked of the network."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))  # read at import
    with pytest.raises(HubError) as error:
        resolve_hf_folder("HuggingFaceTB/SmolLM2-135M")
    message = str(error.value)
    assert message == ("cannot fetch 'HuggingFaceTB/SmolLM2-135M' from the Hugging Face hub (offline: HF_HUB_OFFLINE "
                       f"is set and the model is not in the local hub cache); {LOCAL_ALTERNATIVE}")


def test_a_hub_id_from_the_cache_then_online(tmp_path, hub):
    calls, answers = hub
    answers[True] = tmp_path  # in the cache: no download
    assert resolve_hf_folder("owner/name") == tmp_path
    assert len(calls) == 1 and calls[0][0] == "owner/name" and calls[0][1]["local_files_only"] is True
    assert "*.safetensors" in calls[0][1]["allow_patterns"] and "*.json" in calls[0][1]["allow_patterns"]
    calls.clear()
    answers[True], answers[False] = not_cached(), tmp_path / "snapshot"
    assert resolve_hf_folder("owner/name@v1.0") == tmp_path / "snapshot"
    assert [(repo, kwargs["local_files_only"], kwargs["revision"]) for repo, kwargs in calls] == [
        ("owner/name", True, "v1.0"), ("owner/name", False, "v1.0")]


def test_offline_env_stops_before_the_download(hub):
    calls, answers = hub
    answers[True] = not_cached()
    hub_offline_values = ["1", "true", "YES", "on"]
    for value in hub_offline_values:
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("HF_HUB_OFFLINE", value)
            with pytest.raises(HubError, match="offline: HF_HUB_OFFLINE is set"):
                resolve_hf_folder("owner/name")
    assert all(kwargs["local_files_only"] for _, kwargs in calls) and len(calls) == len(hub_offline_values)


def test_no_network_is_one_clear_error(hub):
    import httpx

    _, answers = hub
    answers[True], answers[False] = not_cached(), httpx.ConnectError("[Errno -3] Temporary failure in name resolution")
    with pytest.raises(HubError) as error:
        resolve_hf_folder("owner/name")
    assert str(error.value) == ("cannot fetch 'owner/name' from the Hugging Face hub (offline or unreachable: "
                                "ConnectError: [Errno -3] Temporary failure in name resolution); " + LOCAL_ALTERNATIVE)


def test_an_unknown_repository_or_revision(hub):
    import httpx
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    _, answers = hub
    response = httpx.Response(404, request=httpx.Request("GET", "https://huggingface.co/api/models/owner/name"))
    answers[True] = not_cached()
    answers[False] = RepositoryNotFoundError("404 Client Error: Repository Not Found", response=response)
    with pytest.raises(HubError, match=r"owner/name is not on the hub, or is private or gated"):
        resolve_hf_folder("owner/name")
    answers[False] = RevisionNotFoundError("404 Client Error: Revision Not Found", response=response)
    with pytest.raises(HubError, match=r"owner/name has no revision 'v9'"):
        resolve_hf_folder("owner/name@v9")


def test_without_huggingface_hub_is_one_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import huggingface_hub raises ImportError
    with pytest.raises(HubError) as error:
        resolve_hf_folder("owner/name")
    assert str(error.value) == ("cannot fetch 'owner/name' from the Hugging Face hub (huggingface_hub is not "
                                f"installed: pip install 'llmjax[hub]'); {LOCAL_ALTERNATIVE}")
