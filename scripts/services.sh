# Starts, on loopback, the services the tests talk to, and stops them when the calling shell
# exits. Sourced by scripts/test.sh (and usable by hand: `source scripts/services.sh`).
#
#   S3       tests/bin/s3_test_server.rs: s3s-fs (the s3s project's file-backed S3 server)
#            with TCP_NODELAY and listings by prefix; built by `cargo build --bin s3-test-server`
#   DynamoDB DynamoDB Local (AWS's jar, from the npm package amplify-dynamodb-simulator),
#            fetched once into $MEDALLION_TOOLS (default ~/.cache/medallion/tools)
#
# Exports the standard AWS variables pointing at them, so the engine reaches them exactly as
# it would reach MinIO or AWS, plus MEDALLION_TEST_S3=1 and MEDALLION_TEST_DYNAMODB=1 for
# the tests that need them.

tools="${MEDALLION_TOOLS:-$HOME/.cache/medallion/tools}"
mkdir -p "$tools"
s3s_bin="${MEDALLION_S3_SERVER:-${CARGO_TARGET_DIR:-target}/debug/s3-test-server}"
ddb_dir="$tools/dynamodb-local"

if [[ ! -x "$s3s_bin" ]]; then
    echo "services: $s3s_bin is missing: run cargo build --bin s3-test-server first" >&2
    return 1
fi
if [[ ! -f "$ddb_dir/emulator/DynamoDBLocal.jar" ]]; then
    echo "services: fetching DynamoDB Local (npm package amplify-dynamodb-simulator, once)"
    (cd "$tools" && npm pack --silent amplify-dynamodb-simulator@2.9.30 >/dev/null \
        && rm -rf package && tar xzf amplify-dynamodb-simulator-2.9.30.tgz \
        && rm -rf "$ddb_dir" && mv package "$ddb_dir" && rm -f amplify-dynamodb-simulator-2.9.30.tgz)
fi

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

wait_for_port() { # name port pid
    for _ in $(seq 1 300); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$2") 2>/dev/null; then return 0; fi
        if ! kill -0 "$3" 2>/dev/null; then echo "services: $1 exited at start" >&2; return 1; fi
        sleep 0.1
    done
    echo "services: $1 did not listen on port $2 within 30 s" >&2
    return 1
}

services_dir="$(mktemp -d -t medallion-services.XXXXXX)"
s3_port="$(free_port)"
ddb_port="$(free_port)"
mkdir -p "$services_dir/s3"
"$s3s_bin" --port "$s3_port" --access-key medalliontest \
    --secret-key medalliontestsecret "$services_dir/s3" >"$services_dir/s3.log" 2>&1 &
s3_pid=$!
(cd "$ddb_dir/emulator" && exec java -Djava.library.path=DynamoDBLocal_lib -jar DynamoDBLocal.jar \
    -inMemory -port "$ddb_port") >"$services_dir/dynamodb.log" 2>&1 &
ddb_pid=$!

stop_services() {
    kill "$s3_pid" "$ddb_pid" 2>/dev/null || true
    wait "$s3_pid" "$ddb_pid" 2>/dev/null || true
    rm -rf "$services_dir"
}
trap stop_services EXIT

wait_for_port s3s-fs "$s3_port" "$s3_pid"
wait_for_port "DynamoDB Local" "$ddb_port" "$ddb_pid"

# DynamoDB Local accepts only letters and digits in an access key.
export AWS_ACCESS_KEY_ID=medalliontest
export AWS_SECRET_ACCESS_KEY=medalliontestsecret
export AWS_REGION=us-east-1
export AWS_ENDPOINT_URL_S3="http://127.0.0.1:$s3_port"
export AWS_ENDPOINT_URL_DYNAMODB="http://127.0.0.1:$ddb_port"
# Nothing here may reach a real AWS account or read the user's profile.
export AWS_EC2_METADATA_DISABLED=true
export AWS_CONFIG_FILE=/dev/null AWS_SHARED_CREDENTIALS_FILE=/dev/null
export MEDALLION_TEST_S3=1 MEDALLION_TEST_DYNAMODB=1

# CreateBucket through the S3 API (SigV4-signed by curl), as with any S3 server.
s3_create_bucket() {
    curl --fail --silent --show-error --aws-sigv4 "aws:amz:$AWS_REGION:s3" \
        --user "$AWS_ACCESS_KEY_ID:$AWS_SECRET_ACCESS_KEY" \
        -H "x-amz-content-sha256: UNSIGNED-PAYLOAD" -X PUT "$AWS_ENDPOINT_URL_S3/$1" >/dev/null
}
# The bucket the tests work in, each under a prefix of its own.
s3_create_bucket medallion-test
echo "services: S3 at $AWS_ENDPOINT_URL_S3, DynamoDB at $AWS_ENDPOINT_URL_DYNAMODB"
