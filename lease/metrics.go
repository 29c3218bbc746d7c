package lease

import (
	"context"
	"errors"
	"time"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/metric"

	"github.com/pglease/pglease/internal/dispatch"
)

// The client's instruments, through the OpenTelemetry metrics API. They exist
// only when Config.MeterProvider is set: otherwise Client.met is nil, every
// method below returns at its first line, and the hot path reads no clock.
// The README's "Metrics" section lists every instrument; keep it in step.

// MeterName is the instrumentation scope of the client's instruments.
const MeterName = "github.com/pglease/pglease/lease"

// Attribute keys of the client's instruments.
const (
	attrMode     = "pglease.lock.mode"            // table, advisory
	attrKind     = "pglease.lock.kind"            // exclusive, shared, permit
	attrOutcome  = "pglease.lock.acquire.outcome" // see acquireOutcome
	attrReason   = "pglease.lock.loss.reason"     // see lossNames
	attrRenewal  = "pglease.heartbeat.outcome"    // see renewalOutcome
	attrNotified = "pglease.notification.type"    // see dispatch.Kind
)

// lockMode is the path a lock was taken on, as an attribute value.
type lockMode uint8

const (
	modeTable lockMode = iota
	modeAdvisory
	numModes
)

var modeNames = [numModes]string{"table", "advisory"}

// lockKind is the kind of lock, as an attribute value. A new kind adds a
// constant and its name here, and says so in kindOf.
type lockKind uint8

const (
	kindExclusive lockKind = iota
	kindShared
	kindPermit
	numKinds
)

var kindNames = [numKinds]string{"exclusive", "shared", "permit"}

// acquireOutcome is how an Acquire or TryAcquire call ended.
type acquireOutcome uint8

const (
	outcomeAcquired acquireOutcome = iota
	outcomeLocked                  // refused: ErrLocked (TryAcquire, or ErrAlreadyHeld)
	outcomeCanceled                // the caller's context ended first
	outcomeClosed                  // ErrClosed
	outcomeError                   // anything else: the database, a bad key
	numOutcomes
)

var outcomeNames = [numOutcomes]string{"acquired", "locked", "canceled", "closed", "error"}

// lossNames are the LossReason attribute values, indexed by LossReason.
var lossNames = [...]string{
	LossRenewalTimeout: "renewal_timeout",
	LossHolderExpired:  "holder_expired",
	LossRowDeleted:     "row_deleted",
	LossConnectionLost: "connection_lost",
}

// renewalOutcome is how one heartbeat statement ended.
type renewalOutcome uint8

const (
	renewalRenewed renewalOutcome = iota
	renewalExpired                // the database found the holder expired
	renewalFailed                 // the statement failed or timed out
	numRenewals
	renewalNone = numRenewals // not recorded: the holder was being given up
)

var renewalNames = [numRenewals]string{"renewed", "expired", "failed"}

var notificationNames = [dispatch.NumKinds]string{
	dispatch.KindDelete:   "delete",
	dispatch.KindTruncate: "truncate",
	dispatch.KindProbe:    "probe",
	dispatch.KindOther:    "other",
	dispatch.KindHandoff:  "handoff",
	dispatch.KindPoke:     "poke",
}

// durationBuckets suit both a round trip (a fraction of a millisecond) and a
// wait for a key (seconds): the SDK's default boundaries are for
// milliseconds.
var durationBuckets = []float64{
	0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
	0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300,
}

// meters is the client's instruments, with every attribute set built once,
// so that a measurement allocates nothing of ours.
type meters struct {
	acquireDuration metric.Float64Histogram
	waitDuration    metric.Float64Histogram
	attempts        metric.Int64Counter
	held            metric.Int64UpDownCounter
	waiting         metric.Int64UpDownCounter
	losses          metric.Int64Counter
	renewDuration   metric.Float64Histogram
	notifications   metric.Int64Counter

	byLock    [numModes][numKinds][]metric.AddOption
	byOutcome [numModes][numKinds][numOutcomes][]metric.RecordOption
	byLoss    [numModes][numKinds][len(lossNames)][]metric.AddOption
	byRenewal [numRenewals][]metric.RecordOption
	byNotify  [dispatch.NumKinds][]metric.AddOption
}

// newMeters makes the instruments, or returns nil when mp is nil.
func newMeters(mp metric.MeterProvider) (*meters, error) {
	if mp == nil {
		return nil, nil
	}
	mt := mp.Meter(MeterName)
	m := &meters{}
	var errs []error
	hist := func(name, desc string) metric.Float64Histogram {
		h, err := mt.Float64Histogram(name, metric.WithUnit("s"), metric.WithDescription(desc),
			metric.WithExplicitBucketBoundaries(durationBuckets...))
		errs = append(errs, err)
		return h
	}
	counter := func(name, unit, desc string) metric.Int64Counter {
		c, err := mt.Int64Counter(name, metric.WithUnit(unit), metric.WithDescription(desc))
		errs = append(errs, err)
		return c
	}
	gauge := func(name, unit, desc string) metric.Int64UpDownCounter {
		c, err := mt.Int64UpDownCounter(name, metric.WithUnit(unit), metric.WithDescription(desc))
		errs = append(errs, err)
		return c
	}
	m.acquireDuration = hist("pglease.lock.acquire.duration",
		"Duration of Acquire and TryAcquire calls, waits included, by outcome.")
	m.waitDuration = hist("pglease.lock.wait.duration",
		"Time an acquire spent waiting for a key that was busy (held, or being acquired by another caller of this client), from the first refusal or queueing to its return; only acquires that waited.")
	m.attempts = counter("pglease.lock.acquire.attempts", "{attempt}",
		"Tries the acquire engine made through the path, each normally one statement.")
	m.held = gauge("pglease.lock.held", "{lock}",
		"Locks this client holds now.")
	m.waiting = gauge("pglease.lock.waiting", "{acquirer}",
		"Acquire calls of this client waiting now for a busy key (queued behind another acquirer of this client, or refused and waiting for a release).")
	m.losses = counter("pglease.lock.losses", "{lock}",
		"Locks lost before their release, by reason.")
	m.renewDuration = hist("pglease.heartbeat.duration",
		"Duration of the heartbeat's renewal statement, by outcome; outcome failed counts the failed renewals.")
	m.notifications = counter("pglease.listener.notifications", "{notification}",
		"Notifications received on the client's LISTEN connection, by type.")
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}

	for md := range numModes {
		for k := range numKinds {
			lock := []attribute.KeyValue{
				attribute.String(attrMode, modeNames[md]),
				attribute.String(attrKind, kindNames[k]),
			}
			m.byLock[md][k] = []metric.AddOption{metric.WithAttributeSet(attribute.NewSet(lock...))}
			for o := range numOutcomes {
				set := attribute.NewSet(append(lock[:2:2], attribute.String(attrOutcome, outcomeNames[o]))...)
				m.byOutcome[md][k][o] = []metric.RecordOption{metric.WithAttributeSet(set)}
			}
			for r, name := range lossNames {
				if name != "" {
					set := attribute.NewSet(append(lock[:2:2], attribute.String(attrReason, name))...)
					m.byLoss[md][k][r] = []metric.AddOption{metric.WithAttributeSet(set)}
				}
			}
		}
	}
	for r := range numRenewals {
		m.byRenewal[r] = []metric.RecordOption{metric.WithAttributes(attribute.String(attrRenewal, renewalNames[r]))}
	}
	for n := range dispatch.NumKinds {
		m.byNotify[n] = []metric.AddOption{metric.WithAttributes(attribute.String(attrNotified, notificationNames[n]))}
	}
	return m, nil
}

// modeOf is the attribute value of a path.
func modeOf(m acquireMode) lockMode {
	if _, ok := m.(*Advisory); ok {
		return modeAdvisory
	}
	return modeTable
}

// attrKindOf is the attribute value of a lock kind.
func attrKindOf(k Kind) lockKind {
	switch k {
	case Shared:
		return kindShared
	case Permit:
		return kindPermit
	}
	return kindExclusive
}

// lockAttrs is the mode and kind of a held lock.
func lockAttrs(l *Lock) (lockMode, lockKind) {
	if l.Advisory() {
		return modeAdvisory, attrKindOf(l.kind)
	}
	return modeTable, attrKindOf(l.kind)
}

// now is the time, or the zero time when there are no instruments.
func (m *meters) now() time.Time {
	if m == nil {
		return time.Time{}
	}
	return time.Now()
}

// acquireObs follows one Acquire or TryAcquire call. Its zero value (no
// instruments) does nothing.
type acquireObs struct {
	m         *meters
	mode      lockMode
	kind      lockKind
	start     time.Time
	waitStart time.Time // zero until the call first waits
}

func (m *meters) startAcquire(am acquireMode, k Kind) acquireObs {
	if m == nil {
		return acquireObs{}
	}
	return acquireObs{m: m, mode: modeOf(am), kind: attrKindOf(k), start: time.Now()}
}

// wait marks the call as waiting for a busy key, from now if it was not
// waiting already.
func (o *acquireObs) wait() {
	if o.m == nil || !o.waitStart.IsZero() {
		return
	}
	o.waitStart = time.Now()
	o.m.waiting.Add(context.Background(), 1, o.m.byLock[o.mode][o.kind]...)
}

// attempt counts one try through the path.
func (o *acquireObs) attempt() {
	if o.m == nil {
		return
	}
	o.m.attempts.Add(context.Background(), 1, o.m.byLock[o.mode][o.kind]...)
}

// done records how the call ended.
func (o *acquireObs) done(ctx context.Context, err error) {
	if o.m == nil {
		return
	}
	end := time.Now()
	out := outcomeOf(ctx, err)
	opts := o.m.byOutcome[o.mode][o.kind][out]
	o.m.acquireDuration.Record(ctx, end.Sub(o.start).Seconds(), opts...)
	if !o.waitStart.IsZero() {
		o.m.waitDuration.Record(ctx, end.Sub(o.waitStart).Seconds(), opts...)
		o.m.waiting.Add(context.Background(), -1, o.m.byLock[o.mode][o.kind]...)
	}
}

func outcomeOf(ctx context.Context, err error) acquireOutcome {
	switch {
	case err == nil:
		return outcomeAcquired
	case errors.Is(err, ErrLocked):
		return outcomeLocked
	case errors.Is(err, ErrClosed):
		return outcomeClosed
	case ctx.Err() != nil:
		return outcomeCanceled
	}
	return outcomeError
}

// heldChange counts l as held (+1) or no longer held (-1).
func (m *meters) heldChange(l *Lock, d int64) {
	if m == nil {
		return
	}
	md, k := lockAttrs(l)
	m.held.Add(context.Background(), d, m.byLock[md][k]...)
}

// lost counts one loss of l for reason.
func (m *meters) lost(l *Lock, reason LossReason) {
	if m == nil {
		return
	}
	if int(reason) < 0 || int(reason) >= len(lossNames) || lossNames[reason] == "" {
		return // a reason without an attribute value: TestLossReasonNames fails
	}
	md, k := lockAttrs(l)
	m.losses.Add(context.Background(), 1, m.byLoss[md][k][reason]...)
}

// renewed records one heartbeat statement begun at start.
func (m *meters) renewed(start time.Time, out renewalOutcome) {
	if m == nil || out == renewalNone {
		return
	}
	m.renewDuration.Record(context.Background(), time.Since(start).Seconds(), m.byRenewal[out]...)
}

// notified counts one notification received by the listener.
func (m *meters) notified(k dispatch.Kind) {
	if m == nil || k >= dispatch.NumKinds {
		return
	}
	m.notifications.Add(context.Background(), 1, m.byNotify[k]...)
}

// renewalOutcomeOf is how a heartbeat statement of a holder whose context is
// hctx ended; renewalNone when the holder was being given up (Close).
func renewalOutcomeOf(hctx context.Context, err error, alive bool) renewalOutcome {
	switch {
	case err != nil && hctx.Err() != nil:
		return renewalNone
	case err != nil:
		return renewalFailed
	case !alive:
		return renewalExpired
	}
	return renewalRenewed
}
