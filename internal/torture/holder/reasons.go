package main

import (
	"context"
	"log/slog"
	"sync"
	"time"
)

// reasons is a slog.Handler that remembers why the client reported locks lost
// ("pglease: lock lost" carries the token, "pglease: holder lost" stands for
// every lock of the holder), so that the holder can say why in EvLost: a lock
// whose row was deleted from under it is a different matter from one whose
// lease could not be renewed in time.
type reasons struct {
	slog.Handler
	mu      *sync.Mutex
	byToken map[int64]string
	holder  *string
}

func newReasons(h slog.Handler) *reasons {
	return &reasons{Handler: h, mu: &sync.Mutex{}, byToken: map[int64]string{}, holder: new(string)}
}

func (r *reasons) Enabled(ctx context.Context, l slog.Level) bool {
	return l >= slog.LevelWarn || r.Handler.Enabled(ctx, l)
}

func (r *reasons) Handle(ctx context.Context, rec slog.Record) error {
	var token int64
	var reason string
	rec.Attrs(func(a slog.Attr) bool {
		switch a.Key {
		case "token":
			token = a.Value.Int64()
		case "reason":
			reason = a.Value.String()
		}
		return true
	})
	if reason != "" {
		r.mu.Lock()
		switch rec.Message {
		case "pglease: lock lost":
			r.byToken[token] = reason
		case "pglease: holder lost":
			*r.holder = "holder lost: " + reason
		}
		r.mu.Unlock()
	}
	if !r.Handler.Enabled(ctx, rec.Level) {
		return nil
	}
	return r.Handler.Handle(ctx, rec)
}

func (r *reasons) WithAttrs(as []slog.Attr) slog.Handler {
	c := *r
	c.Handler = r.Handler.WithAttrs(as)
	return &c
}

func (r *reasons) WithGroup(name string) slog.Handler {
	c := *r
	c.Handler = r.Handler.WithGroup(name)
	return &c
}

// of returns why the lock with token was lost, waiting a little for the log
// record if the loss was signalled before it was logged.
func (r *reasons) of(token int64) string {
	for i := 0; ; i++ {
		r.mu.Lock()
		s, ok := r.byToken[token]
		delete(r.byToken, token)
		h := *r.holder
		r.mu.Unlock()
		switch {
		case ok:
			return s
		case i == 5:
			if h != "" {
				return h
			}
			return "unknown"
		}
		time.Sleep(10 * time.Millisecond)
	}
}
