package main

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/http"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pglease/pglease/reaper"
)

// connectTimeout bounds the connection check at start, on top of the
// connection settings' own connect_timeout (10s unless they set one).
const connectTimeout = 30 * time.Second

// runDaemon checks that it can log in, serves /healthz and /metrics, runs a
// pass at once (unless told not to), then passes on the schedule until ctx
// is done.
func runDaemon(ctx context.Context, pool *pgxpool.Pool, r *reaper.Reaper, m *metrics, log *slog.Logger, opts *options) int {
	// Bad credentials or a wrong host fail here, at once, instead of as
	// one failed pass after another in a daemon that looks alive.
	pctx, cancel := context.WithTimeout(ctx, connectTimeout)
	err := pool.Ping(pctx)
	cancel()
	switch {
	case err != nil && ctx.Err() != nil:
		log.Info(msgStopped)
		return exitOK
	case err != nil:
		log.Error(msgNoConnect, "error", err.Error(), "hint", connectHint(err))
		return exitFailed
	}

	var srv *http.Server
	httpFailed := make(chan error, 1)
	if opts.listen != "" {
		ln, err := net.Listen("tcp", opts.listen)
		if err != nil {
			log.Error(msgHTTPFailed, "error", err.Error(), "listen", opts.listen,
				"hint", "choose a free address with --listen, e.g. :9187")
			return exitFailed
		}
		mux := http.NewServeMux()
		mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) {
			healthy, body := m.health()
			w.Header().Set("Content-Type", "text/plain; charset=utf-8")
			if !healthy {
				w.WriteHeader(http.StatusServiceUnavailable)
			}
			_, _ = io.WriteString(w, body)
		})
		mux.Handle("/metrics", m.handler())
		srv = &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
		log.Info(msgListening, "addr", ln.Addr().String())
		go func() {
			if err := srv.Serve(ln); !errors.Is(err, http.ErrServerClosed) {
				httpFailed <- err
			}
		}()
	}
	shutdownHTTP := func(ctx context.Context) {
		if srv != nil {
			_ = srv.Shutdown(ctx)
		}
	}

	if !opts.skipFirstPass {
		// A failure is logged and counted like a scheduled pass's: the
		// schedule goes on, and /healthz tells.
		if code := runOnce(ctx, r, log); code == exitOK && ctx.Err() != nil {
			shutdownHTTP(context.Background())
			log.Info(msgStopped)
			return exitOK
		}
	}
	if err := r.Start(opts.schedule); err != nil { // validated in parse already
		log.Error(msgStartFailed, "error", err.Error())
		shutdownHTTP(context.Background())
		return exitUsage
	}
	log.Info(msgStarted, "schema", opts.schema, "schedule", opts.schedule,
		"next_run", r.NextRun().Format(time.RFC3339), "dry_run", opts.dryRun, "first_pass", !opts.skipFirstPass)

	code := exitOK
	select {
	case <-ctx.Done():
		log.Info(msgStopping)
	case err := <-httpFailed:
		log.Error(msgHTTPFailed, "error", err.Error())
		code = exitFailed
	}
	// A running pass finishes its batch, which takes at most the batch
	// timeout (plus the client's grace); give it a little more than that.
	stopCtx, cancel := context.WithTimeout(context.Background(), r.Config().BatchTimeout+5*time.Second)
	defer cancel()
	if err := r.Stop(stopCtx); err != nil {
		log.Error(msgStopFailed, "error", err.Error())
		code = exitFailed
	}
	shutdownHTTP(stopCtx)
	log.Info(msgStopped)
	return code
}
