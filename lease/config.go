package lease

import (
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"time"
	"unicode/utf8"

	"go.opentelemetry.io/otel/metric"

	"github.com/pglease/pglease/internal/ident"
)

// Defaults. A zero Config uses all of them.
const (
	// SchemaDefault is the schema the tables and functions live in.
	SchemaDefault = "lease"
	// TTLDefault is the lease duration of a holder.
	TTLDefault = 30 * time.Second
	// PollIntervalDefault is the fallback poll of a waiting Acquire.
	PollIntervalDefault = 2 * time.Second
	// ReleaseTimeoutDefault bounds a Release whose context is already done.
	ReleaseTimeoutDefault = 5 * time.Second
	// MinTTL is the shortest TTL accepted.
	MinTTL = 50 * time.Millisecond
	// MaxOwnerBytes limits Owner.Host and Owner.Application.
	MaxOwnerBytes = 255
)

// Owner identifies a Client in the holders table and in the DBA views.
type Owner struct {
	// Host defaults to os.Hostname().
	Host string
	// PID defaults to os.Getpid().
	PID int32
	// Application defaults to the base name of os.Args[0].
	Application string
}

// Config configures a Client. The zero value works: every field has a
// documented default.
type Config struct {
	// Schema holding the pglease tables (see package migrations). Quoted, never
	// interpolated raw. Defaults to SchemaDefault ("lease").
	Schema string

	// TTL is how long the database considers this client alive after its last
	// successful heartbeat. A crashed or cut-off process loses its locks this
	// long after its last renewal. At least MinTTL. Defaults to TTLDefault (30s).
	TTL time.Duration

	// HeartbeatInterval is how often the lease is renewed: one statement per
	// interval, however many locks the client holds. At most
	// (TTL - SafetyMargin) / 2, so that a failed renewal is retried before the
	// lease runs out. Defaults to TTL / 3.
	HeartbeatInterval time.Duration

	// SafetyMargin: the client reports its locks lost when TTL - SafetyMargin
	// has passed since the start of the last successful renewal (on the local
	// monotonic clock), before the database could consider them expired.
	// Between 0 and TTL/2, exclusive. Defaults to TTL / 6.
	SafetyMargin time.Duration

	// PollInterval is how often a waiting Acquire re-checks when no
	// notification arrives (a missed NOTIFY, no LISTEN behind a
	// transaction-pooling proxy). Jittered by ±20%. Defaults to
	// PollIntervalDefault (2s).
	PollInterval time.Duration

	// ReleaseTimeout bounds Release and Close's clean-up when the caller's
	// context is already done. Defaults to ReleaseTimeoutDefault (5s).
	ReleaseTimeout time.Duration

	// Owner is recorded in the holders table. Defaults: see Owner.
	Owner Owner

	// Logger receives the client's log records. Defaults to discarding them.
	Logger *slog.Logger

	// Advisory configures the advisory fast path (Client.Advisory). Defaults:
	// see AdvisoryConfig.
	Advisory AdvisoryConfig

	// MeterProvider receives the client's metrics (acquire and wait
	// durations, held locks, losses by reason, heartbeats, notifications:
	// the README's "Metrics" section lists them), through a meter named
	// MeterName. Defaults to nil: no instruments are made and nothing is
	// measured.
	MeterProvider metric.MeterProvider

	// Replication says what to do when the check at first use finds that an
	// acquire's commit does not wait for a standby, so that a failover could
	// lose granted locks (see ReplicationPolicy and README "Failover").
	// Defaults to ReplicationWarn.
	Replication ReplicationPolicy
}

// resolve returns a copy of cfg with defaults filled in, or a *ConfigError.
func (cfg *Config) resolve() (Config, error) {
	var c Config
	if cfg != nil {
		c = *cfg
	}
	if c.Schema == "" {
		c.Schema = SchemaDefault
	}
	if err := ident.ValidateSchema(c.Schema); err != nil {
		return c, fmt.Errorf("%w: %w", &ConfigError{Field: "Schema", Err: "see the wrapped error"}, err)
	}
	if c.TTL == 0 {
		c.TTL = TTLDefault
	}
	if c.TTL < MinTTL {
		return c, &ConfigError{"TTL", fmt.Sprintf("%s is below the minimum %s; leave it 0 for %s", c.TTL, MinTTL, TTLDefault)}
	}
	if c.SafetyMargin == 0 {
		c.SafetyMargin = c.TTL / 6
	}
	if c.SafetyMargin < 0 || c.SafetyMargin >= c.TTL/2 {
		return c, &ConfigError{"SafetyMargin", fmt.Sprintf("%s must be > 0 and < TTL/2 (%s); leave it 0 for TTL/6", c.SafetyMargin, c.TTL/2)}
	}
	if c.HeartbeatInterval == 0 {
		c.HeartbeatInterval = c.TTL / 3
		if max := (c.TTL - c.SafetyMargin) / 2; c.HeartbeatInterval > max {
			c.HeartbeatInterval = max
		}
	}
	if max := (c.TTL - c.SafetyMargin) / 2; c.HeartbeatInterval <= 0 || c.HeartbeatInterval > max {
		return c, &ConfigError{"HeartbeatInterval", fmt.Sprintf("%s must be > 0 and at most (TTL - SafetyMargin)/2 = %s so a failed renewal can be retried in time; leave it 0 for TTL/3", c.HeartbeatInterval, max)}
	}
	if c.PollInterval == 0 {
		c.PollInterval = PollIntervalDefault
	}
	if c.PollInterval < time.Millisecond {
		return c, &ConfigError{"PollInterval", fmt.Sprintf("%s is below 1ms; leave it 0 for %s", c.PollInterval, PollIntervalDefault)}
	}
	if c.ReleaseTimeout == 0 {
		c.ReleaseTimeout = ReleaseTimeoutDefault
	}
	if c.ReleaseTimeout < 0 {
		return c, &ConfigError{"ReleaseTimeout", fmt.Sprintf("%s is negative; leave it 0 for %s", c.ReleaseTimeout, ReleaseTimeoutDefault)}
	}
	if c.Owner.Host == "" {
		c.Owner.Host, _ = os.Hostname()
		if c.Owner.Host == "" {
			c.Owner.Host = "unknown"
		}
	}
	if c.Owner.PID == 0 {
		c.Owner.PID = int32(os.Getpid())
	}
	if c.Owner.Application == "" {
		c.Owner.Application = filepath.Base(os.Args[0])
	}
	if err := checkOwner("Owner.Host", c.Owner.Host); err != nil {
		return c, err
	}
	if err := checkOwner("Owner.Application", c.Owner.Application); err != nil {
		return c, err
	}
	if c.Owner.PID < 0 {
		return c, &ConfigError{"Owner.PID", "is negative"}
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	if c.Replication < ReplicationWarn || c.Replication > ReplicationIgnore {
		return c, &ConfigError{"Replication", fmt.Sprintf("%d is not a ReplicationPolicy; leave it 0 for ReplicationWarn", int(c.Replication))}
	}
	adv, err := c.Advisory.resolve()
	if err != nil {
		return c, err
	}
	c.Advisory = adv
	return c, nil
}

func checkOwner(field, s string) error {
	switch {
	case len(s) > MaxOwnerBytes:
		return &ConfigError{field, fmt.Sprintf("is %d bytes, the limit is %d", len(s), MaxOwnerBytes)}
	case !utf8.ValidString(s):
		return &ConfigError{field, "is not valid UTF-8"}
	case strings.IndexByte(s, 0) >= 0:
		return &ConfigError{field, "contains a NUL byte"}
	}
	return nil
}

var errNilPool = &ConfigError{"pool", "is nil: pass a *pgxpool.Pool from pgxpool.New"}
