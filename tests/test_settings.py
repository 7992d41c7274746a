"""Settings are validated at start: a bad value is refused with a message naming the flag and the variable, and a
secret never shows in that message or in the effective configuration that is logged."""

from __future__ import annotations

from pathlib import Path

import pytest

from controlplane import cli
from controlplane.settings import ControlPlaneSettings
from gateway import settings as common
from gateway.authz.settings import AuthzSettings
from gateway.errors import ConfigError
from gateway.meter.settings import MeterSettings
from gateway.settings import CommonSettings, load
from gateway.store import open_store

PEPPER = "p" * 16
SECRET = "s" * 16
PASSWORD = "hunter2-hunter2"
SERVERS = [
    pytest.param(AuthzSettings, {}, id="authz"),
    pytest.param(MeterSettings, {"upstream": "http://127.0.0.1:8080"}, id="meter"),
    pytest.param(ControlPlaneSettings, {}, id="controlplane"),
]


@pytest.mark.parametrize(("cls", "extra"), SERVERS)
@pytest.mark.parametrize("secret", ["", "short"])
def test_identity_secret_shorter_than_16_is_refused(
    cls: type[CommonSettings], extra: dict[str, str], secret: str
) -> None:
    """An empty MAAS_IDENTITY_SECRET (a Secret key that is missing) would sign or accept identity headers with an
    empty HMAC key, which anyone can forge."""
    with pytest.raises(ConfigError, match="--identity-secret / MAAS_IDENTITY_SECRET must be at least 16"):
        load(cls, key_pepper=PEPPER, identity_secret=secret, **extra)


@pytest.mark.parametrize(("cls", "extra"), SERVERS)
def test_dev_mode_with_a_real_pepper_is_refused(cls: type[CommonSettings], extra: dict[str, str]) -> None:
    """--dev turns on public secrets (the control plane accepts a fixed admin token): a process given a production
    pepper must not run that way by a left-over MAAS_DEV."""
    with pytest.raises(ConfigError, match="--dev / MAAS_DEV cannot be combined with --key-pepper / MAAS_KEY_PEPPER"):
        load(cls, dev=True, key_pepper=PEPPER, identity_secret=SECRET, **extra)
    assert load(cls, dev=True, key_pepper=None, **extra).dev


def test_a_short_pepper_names_its_flag() -> None:
    with pytest.raises(ConfigError, match="--key-pepper / MAAS_KEY_PEPPER must be at least 16"):
        load(AuthzSettings, key_pepper="short", identity_secret=SECRET)


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        pytest.param(f"redis://u:{PASSWORD}@127.0.0.1:abc/0", "port", id="port-not-a-number"),
        pytest.param(f"redis://u:{PASSWORD}@127.0.0.1:99999/0", "port", id="port-out-of-range"),
        pytest.param(f"redis://u:{PASSWORD}@127.0.0.1:0/0", "port", id="port-zero"),
        pytest.param(f"http://u:{PASSWORD}@127.0.0.1/0", "scheme must be one of", id="http"),
        pytest.param(f"127.0.0.1:6379?password={PASSWORD}", "scheme must be one of", id="no-scheme"),
        pytest.param("", "scheme must be one of", id="empty"),
        pytest.param(f"redis://:{PASSWORD}@/0", "needs a host", id="no-host"),
        pytest.param("unix://", "socket's path", id="unix-without-path"),
        pytest.param("redis://127.0.0.1:6379/zero", "database number", id="db-not-a-number"),
        pytest.param(f"redis://u:{PASSWORD}@a:7000,b:7001/0", "several nodes need redis+cluster://", id="two-hosts"),
        pytest.param(
            f"redis+cluster://u:{PASSWORD}@a:7000,,b:7001/0",
            "node 2 of 3 in the node list is empty",
            id="cluster-empty",
        ),
        pytest.param(
            f"redis+cluster://u:{PASSWORD}@a:7000,b:7001,/0",
            "node 3 of 3 in the node list is empty",
            id="cluster-comma",
        ),
        pytest.param(
            f"redis+cluster://u:{PASSWORD}@a:7000,b:abc/0",
            "node 2 of 2 in the node list (b:abc): malformed URL: the port must be a number",
            id="cluster-port",
        ),
        pytest.param(
            f"rediss+cluster://u:{PASSWORD}@a:7000,:7001/0",
            "node 2 of 2 in the node list (:7001): rediss+cluster:// needs a host",
            id="cluster-host",
        ),
        pytest.param(
            f"redis+cluster://u:{PASSWORD}@a:7000,b:7001,a:7000/0",
            "node 3 of 3 in the node list (a:7000) is listed twice",
            id="cluster-twice",
        ),
    ],
)
def test_bad_redis_url_is_refused_at_start_without_echoing_it(url: str, problem: str) -> None:
    with pytest.raises(ConfigError, match="--redis-url / MAAS_REDIS_URL") as caught:
        load(AuthzSettings, key_pepper=PEPPER, identity_secret=SECRET, redis_url=url)
    assert problem in str(caught.value)
    assert PASSWORD not in str(caught.value)


@pytest.mark.parametrize(
    "url",
    [
        "redis://127.0.0.1:6379/0",
        "redis://redis",
        f"redis://default:{PASSWORD}@redis.maas-system.svc:6379/2",
        "rediss://redis:6380/0?ssl_cert_reqs=required&ssl_ca_certs=/etc/ssl/ca.pem",
        "unix:///run/redis/redis.sock?db=0",
        f"unix://:{PASSWORD}@/run/redis/redis.sock",
        "redis+cluster://redis-0.redis:7000",
        "rediss+cluster://[::1]:7000/0",
        f"redis+cluster://maas:{PASSWORD}@redis-0.redis:7000,redis-1.redis:7000,redis-2.redis:7000/0",
        "rediss+cluster://[::1]:7000,[::1]:7001,redis-cluster:7000?ssl_cert_reqs=required",
        "memory://",
    ],
)
def test_store_urls_of_every_scheme_are_accepted(url: str) -> None:
    assert load(AuthzSettings, key_pepper=PEPPER, identity_secret=SECRET, redis_url=url).redis_url == url


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        pytest.param(f"redis://u:{PASSWORD}@h:6379/0", "redis://***@h:6379/0", id="userinfo"),
        pytest.param(f"redis://h:6379/0?password={PASSWORD}&db=1", "redis://h:6379/0?password=***&db=1", id="query"),
        pytest.param(f"unix://:{PASSWORD}@/run/r.sock?db=2", "unix://***@/run/r.sock?db=2", id="unix"),
        pytest.param("rediss://h/0?ssl_cert_reqs=none", "rediss://h/0?ssl_cert_reqs=none", id="nothing-secret"),
        pytest.param(
            f"redis+cluster://u:{PASSWORD}@h1:7000,h2:7001/0", "redis+cluster://***@h1:7000,h2:7001/0", id="seeds"
        ),
    ],
)
def test_logged_configuration_hides_redis_passwords(url: str, shown: str) -> None:
    settings = load(AuthzSettings, key_pepper=PEPPER, identity_secret=SECRET, redis_url=url)
    logged = settings.redacted()
    assert logged["redis_url"] == shown == common.redact_url(url)
    assert PASSWORD not in repr(logged) and PEPPER not in repr(logged) and SECRET not in repr(logged)


def test_unsupported_store_url_error_does_not_echo_the_url() -> None:
    with pytest.raises(ConfigError, match="scheme http://") as caught:
        open_store(f"http://u:{PASSWORD}@127.0.0.1/0")
    assert PASSWORD not in str(caught.value)


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        pytest.param(f"http://u:{PASSWORD}@vllm:abc", "port", id="port-not-a-number"),
        pytest.param("http://vllm:0", "port", id="port-zero"),
        pytest.param(f"http://u:{PASSWORD}@vllm:8080", "user info", id="userinfo"),
        pytest.param(f"ftp://u:{PASSWORD}@vllm", "http(s) URL", id="ftp"),
        pytest.param("http://vllm:8080/?x=1", "query", id="query"),
        pytest.param("http://vllm:8080#top", "fragment", id="fragment"),
    ],
)
def test_bad_upstream_is_refused_without_echoing_it(url: str, problem: str) -> None:
    with pytest.raises(ConfigError, match="--upstream / MAAS_UPSTREAM") as caught:
        load(MeterSettings, upstream=url, key_pepper=PEPPER, identity_secret=SECRET)
    assert problem in str(caught.value)
    assert PASSWORD not in str(caught.value)


def test_upstream_with_a_path_prefix_is_kept() -> None:
    settings = load(MeterSettings, upstream="https://vllm:8443/base/", key_pepper=PEPPER, identity_secret=SECRET)
    assert settings.upstream == "https://vllm:8443/base"


@pytest.mark.parametrize("value", ["tokenize", '["/tokenize","/detokenize"]', "/tokenize,detokenize"])
def test_passthrough_posts_must_be_paths(value: str) -> None:
    """A path without its '/' (or a JSON list) would never match a request: refused rather than ignored."""
    with pytest.raises(ConfigError, match=r"--passthrough-posts / MAAS_PASSTHROUGH_POSTS: .*start with '/'"):
        load(MeterSettings, upstream="http://vllm", passthrough_posts=value, key_pepper=PEPPER, identity_secret=SECRET)
    settings = load(
        MeterSettings, upstream="http://vllm", passthrough_posts=" /tokenize, /pooling ,", dev=True, key_pepper=None
    )
    assert settings.passthrough_posts == " /tokenize, /pooling ,"


def test_a_flag_wins_over_its_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAAS_PORT", "27005")
    monkeypatch.setenv("MAAS_ON_STORE_ERROR", "allow")
    settings = load(AuthzSettings, key_pepper=PEPPER, identity_secret=SECRET, port=27006)
    assert settings.port == 27006 and settings.on_store_error == "allow"


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        pytest.param(["authz", "--port", "abc"], "--port / MAAS_PORT: Input should be a valid integer", id="int"),
        pytest.param(
            ["authz", "--on-store-error", "open"],
            "--on-store-error / MAAS_ON_STORE_ERROR: Input should be",
            id="choice",
        ),
        pytest.param(
            ["meter", "--upstream", "http://vllm", "--store-timeout", "soon"],
            "--store-timeout / MAAS_STORE_TIMEOUT: Input should be a valid number",
            id="float",
        ),
        pytest.param(["controlplane", "--resync-period", "often"], "--resync-period / MAAS_RESYNC_PERIOD", id="cp"),
        pytest.param(["sim", "--max-model-len", "big"], "--max-model-len / MAAS_MAX_MODEL_LEN", id="sim"),
    ],
)
def test_a_bad_flag_value_is_one_line_naming_flag_and_variable(
    argv: list[str], named: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A bad value given as a flag was argparse's usage dump naming the flag alone, while the same value in the
    variable was the one-line error naming both that the README promises."""
    monkeypatch.setenv("MAAS_IDENTITY_SECRET", SECRET)  # the bad flag is the only problem
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"invalid settings: {named}" in err


def test_flag_values_are_converted_by_the_settings() -> None:
    args = cli.build_parser("authz").parse_args(
        ["authz", "--identity-secret", SECRET, "--port", "8501", "--store-timeout", "0.5", "--on-store-error", "local"]
    )
    settings = load(AuthzSettings, args)
    assert (settings.port, settings.store_timeout, settings.on_store_error) == (8501, 0.5, "local")


@pytest.mark.parametrize(
    ("value", "expected"),
    [("0", False), ("false", False), ("no", False), ("off", False), ("1", True), ("true", True), ("yes", True)],
)
def test_switch_variables(monkeypatch: pytest.MonkeyPatch, value: str, expected: bool) -> None:
    monkeypatch.setenv("MAAS_ALLOW_UNROUTED", value)
    assert load(AuthzSettings, key_pepper=PEPPER, identity_secret=SECRET).allow_unrouted is expected


@pytest.mark.parametrize("value", ["", "maybe"])
def test_switch_variable_that_is_no_boolean_is_refused(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("MAAS_ALLOW_UNROUTED", value)
    with pytest.raises(ConfigError, match="--allow-unrouted / MAAS_ALLOW_UNROUTED: Input should be a valid boolean"):
        load(AuthzSettings, key_pepper=PEPPER, identity_secret=SECRET)


@pytest.mark.parametrize(
    ("timing", "named"),
    [
        pytest.param(
            {"lease_duration": 5.0}, "--renew-deadline / MAAS_RENEW_DEADLINE (10) must be less than", id="deadline"
        ),
        pytest.param({"renew_deadline": 15.0}, "--lease-duration / MAAS_LEASE_DURATION (15)", id="deadline-equal"),
        pytest.param({"retry_period": 10.0}, "--retry-period / MAAS_RETRY_PERIOD (10) must be less than", id="retry"),
    ],
)
def test_leader_election_timing_that_cannot_work_is_refused(timing: dict[str, float], named: str) -> None:
    """Such timing was clamped in silence (a deadline equal to the lease leaves no margin before another replica
    may take over; a retry period past the deadline makes the leader drop out between renewals)."""
    with pytest.raises(ConfigError) as caught:
        load(ControlPlaneSettings, key_pepper=PEPPER, **timing)
    assert named in str(caught.value)
    assert load(ControlPlaneSettings, key_pepper=PEPPER, lease_duration=2.0, renew_deadline=1.5, retry_period=0.2)


def test_a_misspelt_variable_is_named_with_the_setting_it_resembles() -> None:
    """A typo in a variable's name (MAAS_ON_STORE_ERRORS) was ignored without a word: the default applied."""
    environ = {
        "MAAS_ON_STORE_ERRORS": "allow",  # a typo of one of authz's settings
        "MAAS_ON_STORE_ERROR": "deny",  # the setting itself
        "MAAS_UPSTREAM": "http://127.0.0.1:8081",  # the meter's, in a shared environment: not authz's concern
        "MAAS_REQUIRE_CRDS": "1",
        "PATH": "/usr/bin",
    }
    assert common.misspelt_variables(AuthzSettings, environ) == [("MAAS_ON_STORE_ERRORS", "MAAS_ON_STORE_ERROR")]
    assert common.misspelt_variables(MeterSettings, {"MAAS_UPSTRAEM": "x"}) == [("MAAS_UPSTRAEM", "MAAS_UPSTREAM")]


def test_misspelt_variables_are_logged(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("MAAS_METRICS_MAX_KEY", "10")
    with caplog.at_level("WARNING", logger="maas.settings"):
        common.warn_misspelt_variables(AuthzSettings)
    assert (
        "MAAS_METRICS_MAX_KEY is not a setting of this process and is ignored; did you mean MAAS_METRICS_MAX_KEYS?"
        in (caplog.text)
    )


SECRET_SETTINGS = [
    pytest.param(cls, extra, name, id=f"{cls.__name__}-{name}")
    for cls, extra in ((AuthzSettings, {}), (MeterSettings, {"upstream": "http://vllm"}), (ControlPlaneSettings, {}))
    for name in ("key_pepper", "identity_secret", "redis_url")
]
VALUES = {"key_pepper": PEPPER, "identity_secret": SECRET, "redis_url": f"redis://:{PASSWORD}@redis:6379/0"}


def _secret(settings: CommonSettings, name: str) -> str:
    value = getattr(settings, name)
    return str(value if isinstance(value, str) else value.get_secret_value())


@pytest.fixture
def no_secret_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in VALUES:
        monkeypatch.delenv(f"MAAS_{name.upper()}", raising=False)


@pytest.mark.usefixtures("no_secret_variables")
@pytest.mark.parametrize(("cls", "extra", "name"), SECRET_SETTINGS)
def test_every_secret_setting_can_be_read_from_a_file(
    cls: type[CommonSettings], extra: dict[str, str], name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A mounted Secret keeps the value out of the process's environment and argv; the trailing newline a file
    written by an editor or ``echo`` ends with is not part of the value."""
    assert name in common.secret_files(cls)
    values = {**VALUES, **extra}
    path = tmp_path / name
    path.write_text(values.pop(name) + "\n")
    monkeypatch.setenv(f"MAAS_{name.upper()}_FILE", str(path))
    settings = load(cls, **values)
    assert _secret(settings, name) == VALUES[name]
    args = cli.build_parser("controlplane").parse_args(["controlplane", f"--{name.replace('_', '-')}-file", str(path)])
    assert getattr(args, f"{name}_file") == str(path)


@pytest.mark.usefixtures("no_secret_variables")
@pytest.mark.parametrize(("cls", "extra", "name"), SECRET_SETTINGS)
def test_a_secret_given_both_as_value_and_file_is_refused(
    cls: type[CommonSettings], extra: dict[str, str], name: str, tmp_path: Path
) -> None:
    """Which one wins would be a guess; a variable left behind beside a rotated file would win in silence."""
    path = tmp_path / name
    path.write_text(VALUES[name])
    flag, variable = name.replace("_", "-"), f"MAAS_{name.upper()}"
    with pytest.raises(ConfigError) as caught:
        load(cls, **VALUES, **extra, **{f"{name}_file": str(path)})
    assert str(caught.value) == (
        f"invalid settings: --{flag} / {variable} and --{flag}-file / {variable}_FILE are both set: give one of them"
    )


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        pytest.param(None, "cannot be read: No such file or directory", id="missing"),
        pytest.param("", "is empty", id="empty"),
        pytest.param("\n", "is empty", id="newline-only"),
        pytest.param(b"\xff" + PASSWORD.encode(), "is not UTF-8 text", id="not-utf8"),
    ],
)
def test_a_secret_file_that_cannot_be_used_is_named_without_its_content(
    content: str | bytes | None, problem: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MAAS_KEY_PEPPER", raising=False)
    path = tmp_path / "key-pepper"
    if isinstance(content, str):
        path.write_text(content)
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(ConfigError) as caught:
        load(AuthzSettings, key_pepper_file=str(path), identity_secret=SECRET)
    message = str(caught.value)
    assert message == f"invalid settings: --key-pepper-file / MAAS_KEY_PEPPER_FILE: {path} {problem}"
    assert PASSWORD not in message


def test_an_unreadable_secret_file_is_a_one_line_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A Secret mounted at the path of the file (a directory of keys) or one the process's user cannot read
    (defaultMode, fsGroup) is named at start, in one line, with the reason."""
    monkeypatch.delenv("MAAS_IDENTITY_SECRET", raising=False)
    assert cli.main(["authz", "--identity-secret-file", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"maas authz: invalid settings: --identity-secret-file / MAAS_IDENTITY_SECRET_FILE: {tmp_path} cannot be "
        "read: Is a directory\n"
    )


def test_a_short_secret_from_a_file_is_refused_like_a_short_value(tmp_path: Path) -> None:
    path = tmp_path / "identity-secret"
    path.write_text("short\n")
    with pytest.raises(ConfigError, match="--identity-secret / MAAS_IDENTITY_SECRET must be at least 16"):
        load(AuthzSettings, key_pepper=PEPPER, identity_secret_file=str(path))


def test_the_logged_configuration_names_the_file_not_its_content(tmp_path: Path) -> None:
    path = tmp_path / "identity-secret"
    path.write_text(SECRET)
    logged = load(AuthzSettings, key_pepper=PEPPER, identity_secret_file=str(path)).redacted()
    assert logged["identity_secret_file"] == str(path)
    assert SECRET not in repr(logged)
