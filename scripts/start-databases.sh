#!/usr/bin/env bash
# Start Debian's PostgreSQL and MariaDB on loopback for kasched's database tests (idempotent), and
# create the test role/user "kasched" (password "kasched") allowed to create databases.
# Prints one line per server: NAME URL   (the admin URL the tests use to create scratch databases).
set -euo pipefail
want=${1:-all}

start_postgresql() {
    command -v pg_lsclusters >/dev/null || { echo "postgresql is not installed (scripts/setup.sh installs it)" >&2; exit 1; }
    local version
    version=$(pg_lsclusters -h | awk 'NR==1{print $1}')
    if [ -z "$version" ]; then
        version=$(ls /usr/lib/postgresql | sort -n | tail -1)
        pg_createcluster "$version" main >/dev/null
    fi
    if ! pg_lsclusters -h | awk '{print $4}' | grep -q online; then
        pg_ctlcluster "$version" main start
    fi
    for _ in $(seq 50); do
        su postgres -c "psql -qAtc 'select 1'" >/dev/null 2>&1 && break
        sleep 0.2
    done
    su postgres -c "psql -qAt" >/dev/null <<'SQL'
DO $$ BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'kasched') THEN
    CREATE ROLE kasched LOGIN CREATEDB PASSWORD 'kasched';
  END IF;
END $$;
SQL
    su postgres -c "psql -qAtc \"SELECT 1 FROM pg_database WHERE datname='kasched'\"" | grep -q 1 ||
        su postgres -c "createdb -O kasched kasched"
    echo "postgresql postgresql+psycopg://kasched:kasched@127.0.0.1:5432/kasched"
}

start_mariadb() {
    command -v mariadbd >/dev/null || [ -x /usr/sbin/mariadbd ] ||
        { echo "mariadb-server is not installed (scripts/setup.sh installs it)" >&2; exit 1; }
    mkdir -p /run/mysqld && chown mysql:mysql /run/mysqld
    if ! mariadb-admin --protocol=socket ping >/dev/null 2>&1; then
        [ -d /var/lib/mysql/mysql ] || mariadb-install-db --user=mysql >/dev/null
        (setsid /usr/sbin/mariadbd --user=mysql --bind-address=127.0.0.1 --port=3306 \
            --socket=/run/mysqld/mysqld.sock >/var/log/kasched-test-mariadb.log 2>&1 &)
        for _ in $(seq 100); do
            mariadb-admin --protocol=socket ping >/dev/null 2>&1 && break
            sleep 0.2
        done
    fi
    mariadb --protocol=socket -u root <<'SQL'
CREATE USER IF NOT EXISTS 'kasched'@'127.0.0.1' IDENTIFIED BY 'kasched';
CREATE USER IF NOT EXISTS 'kasched'@'localhost' IDENTIFIED BY 'kasched';
GRANT ALL PRIVILEGES ON *.* TO 'kasched'@'127.0.0.1';
GRANT ALL PRIVILEGES ON *.* TO 'kasched'@'localhost';
CREATE DATABASE IF NOT EXISTS kasched;
SQL
    echo "mariadb mysql+pymysql://kasched:kasched@127.0.0.1:3306/kasched"
}

case "$want" in
    postgresql) start_postgresql ;;
    mariadb) start_mariadb ;;
    all) start_postgresql; start_mariadb ;;
    *) echo "usage: $0 [postgresql|mariadb|all]" >&2; exit 2 ;;
esac
