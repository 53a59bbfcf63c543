"""A real S3 API server on 127.0.0.1 for the tests: moto's server mode with authentication on.

Run with the Python of .venv-s3server (scripts/setup.sh --serving makes it; see requirements.txt for
why it is a venv of its own). Starts moto on a free port with IAM authentication (every request must be
signed with SigV4 by a key moto knows), creates a user allowed s3:* and its access key, and prints one
JSON line: {"endpoint", "accessKeyId", "secretAccessKey"}. Stops when its standard input closes.
"""
from __future__ import annotations

import json
import logging
import os
import sys

# moto lets this many requests through unauthenticated (the setup below), then checks every signature.
os.environ["INITIAL_NO_AUTH_ACTION_COUNT"] = "3"
os.environ.setdefault("AWS_ACCESS_KEY_ID", "setup")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "setup")

import boto3  # noqa: E402
from moto.server import ThreadedMotoServer  # noqa: E402

POLICY = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}


def main() -> int:
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request on stderr
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{server._server.server_port}"  # noqa: SLF001 - the port it bound
    iam = boto3.client("iam", endpoint_url=endpoint, region_name="us-east-1")
    iam.create_user(UserName="tuneop")
    iam.put_user_policy(UserName="tuneop", PolicyName="s3", PolicyDocument=json.dumps(POLICY))
    key = iam.create_access_key(UserName="tuneop")["AccessKey"]
    print(json.dumps({"endpoint": endpoint, "accessKeyId": key["AccessKeyId"],
                      "secretAccessKey": key["SecretAccessKey"]}), flush=True)
    sys.stdin.read()
    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
