# Stand-in for the postgres:15 image where no registry answers (scripts/test_stack.sh): Debian's
# postgresql-15 with the part of the official entrypoint the stack uses (POSTGRES_USER / POSTGRES_PASSWORD,
# *.sql in /docker-entrypoint-initdb.d run once on an empty volume).
FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends postgresql-15 \
    && rm -rf /var/lib/apt/lists/*
COPY postgres-entrypoint.sh /usr/local/bin/docker-entrypoint.sh
ENV PGDATA=/var/lib/postgresql/data PATH=/usr/lib/postgresql/15/bin:$PATH
ENTRYPOINT ["/usr/local/bin/docker-entrypoint.sh"]
