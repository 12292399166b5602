#!/usr/bin/env python3
"""Stack smoke test: docker-compose.yml run without a container engine.

Reads docker-compose.yml (and the Dockerfile's ENTRYPOINT/ENV), starts each
service's command from the binaries cargo built, with the environment the
file gives it (service names resolve to 127.0.0.1; the `postgres` service
is the local PostgreSQL server, given the user, password and database the
file names), then runs the README's quick start against it and a start
through each provider handset-sim plays. A renamed variable, flag or port
in the file fails here.

Usage: scripts/stack-smoke.py [BIN_DIR]   (default target/debug)
Needs: PyYAML; PostgreSQL at HANDSET_TEST_POSTGRES_URL (an admin URL,
default postgres://postgres@127.0.0.1:5432/test).
"""

import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN_DIR = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "target", "debug"))
ADMIN_URL = os.environ.get("HANDSET_TEST_POSTGRES_URL", "postgres://postgres@127.0.0.1:5432/test")


def fail(message):
    print(f"stack smoke test FAILED: {message}", file=sys.stderr)
    sys.exit(1)


def dockerfile():
    """The image's ENTRYPOINT and HEALTHCHECK (exec forms) and ENV, as docker would apply them."""
    entrypoint, healthcheck, env = None, None, {}
    with open(os.path.join(ROOT, "Dockerfile")) as f:
        text = f.read().replace("\\\n", " ")
    runtime = text.split("FROM ")[-1]  # the final stage is the image
    for line in runtime.splitlines():
        line = line.strip()
        if line.startswith("ENTRYPOINT "):
            entrypoint = json.loads(line[len("ENTRYPOINT "):])
        elif line.startswith("HEALTHCHECK "):
            healthcheck = json.loads(line.split(" CMD ", 1)[1])
        elif line.startswith("ENV "):
            for pair in shlex.split(line[len("ENV "):]):
                key, _, value = pair.partition("=")
                env[key] = value
    if not entrypoint or not healthcheck:
        fail("the Dockerfile's last stage needs an exec-form ENTRYPOINT and HEALTHCHECK")
    return entrypoint, healthcheck, env


def as_list(value):
    if value is None:
        return []
    return value if isinstance(value, list) else shlex.split(value)


def as_env(value):
    if isinstance(value, list):
        return dict(item.split("=", 1) for item in value)
    return {k: "" if v is None else str(v) for k, v in (value or {}).items()}


def localised(value, services):
    """A value with each URL whose host is a service pointed at 127.0.0.1 (each service runs here)."""

    def relocate(match):
        url = urllib.parse.urlsplit(match.group(0))
        if url.hostname not in services:
            return match.group(0)
        userinfo = url.netloc.rpartition("@")[0]
        netloc = (userinfo + "@" if userinfo else "") + "127.0.0.1" + (f":{url.port}" if url.port else "")
        return urllib.parse.urlunsplit(url._replace(netloc=netloc))

    return re.sub(r"[a-z][a-z0-9+.-]*://[^\s]+", relocate, value)


def psql(url, sql):
    subprocess.run(["psql", url, "-v", "ON_ERROR_STOP=1", "-Atqc", sql], check=True, capture_output=True, text=True)


def prepare_postgres(service):
    env = as_env(service.get("environment"))
    user, password = env.get("POSTGRES_USER", "postgres"), env.get("POSTGRES_PASSWORD", "")
    database = env.get("POSTGRES_DB", user)
    psql(ADMIN_URL, f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")
    psql(
        ADMIN_URL,
        f"DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{user}') THEN "
        f"CREATE ROLE {user} LOGIN PASSWORD '{password}'; END IF; END $$",
    )
    psql(ADMIN_URL, f"CREATE DATABASE {database} OWNER {user}")
    return database


def start_order(services):
    order, seen = [], set()

    def visit(name):
        if name in seen:
            return
        seen.add(name)
        depends = services[name].get("depends_on") or []
        for dependency in depends if isinstance(depends, list) else depends.keys():
            visit(dependency)
        order.append(name)

    for name in services:
        visit(name)
    return order


def http(method, url, body=None, headers=None):
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def wait_until_ready(base, process, name, deadline):
    while time.time() < deadline:
        if process.poll() is not None:
            fail(f"{name} exited with {process.returncode}")
        try:
            if http("GET", f"{base}/ready")[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    fail(f"{name} never answered {base}/ready with 200")


def readme_quick_start():
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    section = readme.split("## Quick start with curl", 1)[1]
    match = re.search(r"```sh\n(.*?)```", section, re.S)
    if not match:
        fail("the README's quick start has no ```sh block")
    return match.group(1)


def main():
    with open(os.path.join(ROOT, "docker-compose.yml")) as f:
        compose = yaml.safe_load(f)
    services = compose["services"]
    entrypoint, healthcheck, image_env = dockerfile()
    processes, logs = [], tempfile.mkdtemp(prefix="handset-stack-")
    database = None
    try:
        for name in start_order(services):
            service = services[name]
            if "build" not in service:
                if not service.get("image", "").startswith("postgres:"):
                    fail(f"service {name} is neither built here nor PostgreSQL")
                database = prepare_postgres(service)
                continue
            for mapping in service.get("ports", []):
                host, _, container = str(mapping).rpartition(":")
                if host.split(":")[-1] != container:
                    fail(f"{name} publishes {mapping}: run here, it needs the same port on both sides")
            argv = as_list(service.get("entrypoint")) or entrypoint
            argv = [os.path.join(BIN_DIR, argv[0])] + argv[1:] + as_list(service.get("command"))
            argv = [localised(arg, services) for arg in argv]
            env = dict(os.environ)
            env.update(image_env)
            env.update({k: localised(v, services) for k, v in as_env(service.get("environment")).items()})
            log = open(os.path.join(logs, f"{name}.log"), "w")
            print(f"== starting {name}: {' '.join(shlex.quote(a) for a in argv)}")
            process = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=logs)
            processes.append((name, process, log))
            bind = env.get("HANDSET__SERVER__BIND") if argv[0].endswith("/handset") else None
            if bind:
                wait_until_ready(f"http://127.0.0.1:{bind.rsplit(':', 1)[1]}", process, name, time.time() + 60)
                probe = [os.path.join(BIN_DIR, healthcheck[0])] + healthcheck[1:]
                checked = subprocess.run(probe, env=env, capture_output=True, text=True, cwd=logs)
                if checked.returncode != 0:
                    fail(f"the image's HEALTHCHECK failed on {name}: {checked.stdout}{checked.stderr}")
            else:
                time.sleep(1)
                if process.poll() is not None:
                    fail(f"{name} exited with {process.returncode}")
        if database is None:
            fail("docker-compose.yml has no postgres service")

        print("== the README quick start")
        run = subprocess.run(["bash", "-e"], input=readme_quick_start(), capture_output=True, text=True, cwd=logs)
        print(run.stdout)
        if run.returncode != 0:
            fail(f"the quick start exited with {run.returncode}: {run.stderr}")
        answers = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
        if len(answers) != 5 or any("errors" in answer for answer in answers):
            fail(f"the quick start should print 5 answers without errors, got {answers}")
        if answers[1]["status"]["code"] != 200 or answers[4]["provider"] != "sandbox":
            fail("the quick start's confirm did not succeed")

        print("== starts through the providers handset-sim plays")
        key = {"Authorization": "Bearer hs_dev_sandbox_key"}
        for body in (
            {"phone": "8885551234", "provider": "idme"},
            {"phone": "8885551234", "provider": "veratad", "name": {"first": "Ada", "last": "Lovelace"}},
            {"phone": "+33612345678", "channel": "network", "provider": "dqe", "redirect_uri": "https://example.com/done"},
        ):
            status, text = http("POST", "http://127.0.0.1:8080/v1/possession", body, key)
            print(status, text)
            if status != 201 or json.loads(text).get("provider") != body["provider"]:
                fail(f"a start through {body['provider']} answered {status}: {text}")
            if body["provider"] == "dqe":
                page = json.loads(text)["next_action"]["url"]
                if not page.startswith("http://localhost:9090/"):
                    fail(f"DQE's operator page should be at the sim's public URL: {page}")
        print("stack smoke test passed")
    finally:
        for name, process, log in reversed(processes):
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
            log.close()
            if process.returncode not in (0, -15):
                print(f"-- {name} log:\n" + open(log.name).read()[-4000:], file=sys.stderr)
        if database:
            psql(ADMIN_URL, f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")


if __name__ == "__main__":
    main()
