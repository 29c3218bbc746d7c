// Command benchtable runs the lease benchmarks (each with the sample size it
// needs) and prints their figures as one Markdown table, each next to its raw
// baseline from the same run, with the ratio and the target.
//
//	go run ./internal/benchtable                 # run everything, print the table
//	go run ./internal/benchtable -count 3        # three runs each, medians
//	go run ./internal/benchtable -from out.txt   # only format saved `go test -bench` output
//
// The raw `go test` output goes to stderr (and to -out, when given), so that
// every figure in the table can be traced to a benchmark line.
package main

import (
	"bufio"
	"flag"
	"fmt"
	"io"
	"math"
	"os"
	"os/exec"
	"regexp"
	"slices"
	"strconv"
	"strings"
)

// run is one `go test -bench` invocation.
type run struct {
	bench     string // -bench regexp
	benchtime string
}

var runs = []run{
	{"^BenchmarkUncontended$", "3000x"},
	{"^BenchmarkTryAcquireHeld$", "5000x"},
	{"^BenchmarkIdleListeners$", "2000x"},
	{"^BenchmarkOneKey8Clients$", "6000x"},
	{"^BenchmarkWaitingCost$", "8x"},
	{"^BenchmarkDistinctKeys8Clients$", "8000x"},
	{"^BenchmarkMillionRows$", "3000x"},
	{"^BenchmarkHold10000$", "20x"},
	{"^BenchmarkAdvisoryUncontended$", "20000x"},
	{"^BenchmarkAdvisoryOneKey8Clients$", "20000x"},
	{"^BenchmarkSharedUncontended$", "2000x"},
	{"^BenchmarkSet10$", "300x"},
	{"^BenchmarkReadersWriter$", "3000x"},
	{"^BenchmarkSemaphore8Clients$", "2000x"},
	{"^BenchmarkSchemaPrevious$", "3000x"},
}

// row is one line of the table: a figure of a benchmark, its baseline (a
// metric of the same benchmark), and a target.
type row struct {
	bench, figure, metric string
	baseName, baseMetric  string
	target                string
	ok                    func(v, ratio float64) bool
}

func atMost(x float64) func(v, r float64) bool  { return func(v, _ float64) bool { return v <= x } }
func atLeast(x float64) func(v, r float64) bool { return func(v, _ float64) bool { return v >= x } }
func ratioAtMost(x float64) func(v, r float64) bool {
	return func(_, r float64) bool { return r <= x }
}
func ratioAtLeast(x float64) func(v, r float64) bool {
	return func(_, r float64) bool { return r >= x }
}

var rows = []row{
	{"Uncontended", "Acquire+Release, µs", "lease_us", "durable INSERT+DELETE pair", "raw_us", "≤ 0.75 × raw", ratioAtMost(0.75)},
	{"Uncontended", "advisory lock+unlock, µs (reference)", "adv_us", "durable INSERT+DELETE pair", "raw_us", "", nil},
	{"TryAcquireHeld", "TryAcquire of a held key, µs", "try_us", "SELECT 1", "select1_us", "≤ 1.3 × SELECT 1", ratioAtMost(1.3)},
	{"IdleListeners", "Acquire+Release, 100 other clients listening, µs", "idle100_us", "the same, 1 other client listening", "idle1_us", "≤ 1.2 × 1", ratioAtMost(1.2)},
	{"OneKey8Clients/hold=0s", "1 key, 8 clients, hold 0: handoffs/s", "handoffs/s", "advisory lock, 8 conns", "adv_handoffs/s", "≥ 1500", atLeast(1500)},
	{"OneKey8Clients/hold=0s", "1 key, 8 clients, hold 0: handoffs/s", "handoffs/s", "durable NOTIFY passed around 8 conns", "ring_passes/s", "", nil},
	{"OneKey8Clients/hold=0s", "… handoff p50, ms", "p50_ms", "advisory lock, 8 conns", "adv_p50_ms", "≤ 1.5", atMost(1.5)},
	{"OneKey8Clients/hold=0s", "… handoff p99, ms", "p99_ms", "advisory lock, 8 conns", "adv_p99_ms", "", nil},
	{"OneKey8Clients/hold=0s", "… smallest client share / mean", "min_share", "advisory lock, 8 conns", "adv_min_share", "≥ 0.8", atLeast(0.8)},
	{"OneKey8Clients/hold=0s", "… largest client share / mean", "max_share", "", "", "", nil},
	{"OneKey8Clients/hold=0s", "… handoffs back to the releasing client", "same_client", "", "", "", nil},
	{"OneKey8Clients/hold=0s", "… acquire statements/s", "acquire_q/s", "", "", "", nil},
	{"OneKey8Clients/hold=0s", "… acquire statements per handoff", "acquire_q/handoff", "", "", "", nil},
	{"OneKey8Clients/hold=0s", "… statements per handoff, the release included", "q/handoff", "", "", "≤ 1.5", atMost(1.5)},
	{"OneKey8Clients/hold=0s", "… handoffs measured (phases end after 20 s)", "count", "", "", "", nil},
	{"OneKey8Clients/hold=2ms", "1 key, 8 clients, hold 2 ms: handoffs/s", "handoffs/s", "advisory lock, 8 conns", "adv_handoffs/s", "≥ 0.85 × advisory", ratioAtLeast(0.85)},
	{"OneKey8Clients/hold=2ms", "1 key, 8 clients, hold 2 ms: handoffs/s", "handoffs/s", "durable NOTIFY passed around 8 conns, 2 ms each", "ring_passes/s", "", nil},
	{"OneKey8Clients/hold=2ms", "… handoff p50, ms", "p50_ms", "advisory lock, 8 conns", "adv_p50_ms", "", nil},
	{"OneKey8Clients/hold=2ms", "… handoff p99, ms", "p99_ms", "advisory lock, 8 conns", "adv_p99_ms", "", nil},
	{"OneKey8Clients/hold=2ms", "… smallest client share / mean", "min_share", "advisory lock, 8 conns", "adv_min_share", "≥ 0.5", atLeast(0.5)},
	{"OneKey8Clients/hold=2ms", "… largest client share / mean", "max_share", "", "", "", nil},
	{"OneKey8Clients/hold=2ms", "… handoffs back to the releasing client", "same_client", "", "", "", nil},
	{"OneKey8Clients/hold=2ms", "… acquire statements/s", "acquire_q/s", "", "", "", nil},
	{"OneKey8Clients/hold=2ms", "… statements per handoff, the release included", "q/handoff", "", "", "", nil},
	{"OneKey8Clients/hold=2ms", "… handoffs measured (phases end after 20 s)", "count", "", "", "", nil},
	{"WaitingCost", "held 1 s, 7 waiting clients: queries per waiter per fallback interval", "q/waiter/poll", "", "", "≤ 1", atMost(1)},
	{"DistinctKeys8Clients", "8 clients, distinct keys: acquisitions/s", "acq/s", "durable INSERT+DELETE pairs/s, 8 conns", "raw_pairs/s", "≥ 1.2 × raw", ratioAtLeast(1.2)},
	{"MillionRows", "1M held rows: Acquire+Release, µs", "full_us", "the same, empty table", "empty_us", "≤ 1.2 × empty", ratioAtMost(1.2)},
	{"Hold10000", "10,000 held locks: statements per heartbeat", "stmts/heartbeat", "", "", "1", atMost(1)},
	{"Hold10000", "… heartbeats per interval", "heartbeats/interval", "", "", "", nil},
	{"Hold10000", "… renewal statement, ms", "renew_ms", "", "", "", nil},
	{"Hold10000", "… Go heap per held lock, bytes", "heap_B/lock", "", "", "≤ 1024", atMost(1024)},
	{"AdvisoryUncontended", "advisory Acquire+Release, µs", "acquire_us", "pg_advisory_lock+unlock pair", "raw_us", "≤ 1.15 × raw", ratioAtMost(1.15)},
	{"AdvisoryUncontended", "advisory TryAcquire+Release, µs", "try_us", "pg_advisory_lock+unlock pair", "raw_us", "", nil},
	{"AdvisoryUncontended", "advisory Acquire+Release, µs", "acquire_us", "pair + durable nextval + pg_notify", "raw_token_us", "", nil},
	{"AdvisoryOneKey8Clients", "advisory, 1 key, 8 clients, hold 0: handoffs/s", "handoffs/s", "advisory lock, 8 conns", "raw_handoffs/s", "≥ 0.8 × raw", ratioAtLeast(0.8)},
	{"AdvisoryOneKey8Clients", "… handoff p99, ms", "p99_ms", "advisory lock, 8 conns", "raw_p99_ms", "", nil},
	{"AdvisoryOneKey8Clients", "… smallest client share / mean", "min_share", "", "", "", nil},
	{"SharedUncontended", "shared AcquireShared+Release, µs", "shared_us", "exclusive Acquire+Release, same client", "exclusive_us", "", nil},
	{"SharedUncontended", "shared AcquireShared+Release, µs", "shared_us", "durable INSERT+DELETE pair", "raw_us", "", nil},
	{"SharedUncontended", "exclusive Acquire+Release, µs", "exclusive_us", "durable INSERT+DELETE pair", "raw_us", "", nil},
	{"Set10", "10-key AcquireSet+Release, µs", "set_us", "10 × Acquire, then 10 × Release", "singles_us", "", nil},
	{"Set10", "10-key AcquireSet+Release, µs", "set_us", "one durable INSERT+DELETE pair", "raw_us", "", nil},
	{"ReadersWriter/hold=0s", "8 readers + 1 writer, hold 0: reads/s", "reads/s", "the 8 readers alone", "alone_reads/s", "", nil},
	{"ReadersWriter/hold=0s", "… reads/s", "reads/s", "advisory shared + exclusive, 9 conns", "adv_reads/s", "", nil},
	{"ReadersWriter/hold=0s", "… writer's acquisitions/s", "writes/s", "advisory shared + exclusive, 9 conns", "adv_writes/s", "", nil},
	{"ReadersWriter/hold=0s", "… writer's wait p50, ms", "write_wait_p50_ms", "advisory shared + exclusive, 9 conns", "adv_write_wait_p50_ms", "", nil},
	{"ReadersWriter/hold=0s", "… writer's wait p99, ms", "write_wait_p99_ms", "advisory shared + exclusive, 9 conns", "adv_write_wait_p99_ms", "", nil},
	{"ReadersWriter/hold=0s", "… smallest reader share / mean", "min_read_share", "", "", "≥ 0.5", atLeast(0.5)},
	{"ReadersWriter/hold=0s", "… reads measured (phases end after 20 s)", "count", "", "", "", nil},
	{"ReadersWriter/hold=2ms", "8 readers + 1 writer, hold 2 ms: reads/s", "reads/s", "the 8 readers alone", "alone_reads/s", "", nil},
	{"ReadersWriter/hold=2ms", "… reads/s", "reads/s", "advisory shared + exclusive, 9 conns", "adv_reads/s", "", nil},
	{"ReadersWriter/hold=2ms", "… writer's acquisitions/s", "writes/s", "advisory shared + exclusive, 9 conns", "adv_writes/s", "", nil},
	{"ReadersWriter/hold=2ms", "… writer's wait p50, ms", "write_wait_p50_ms", "advisory shared + exclusive, 9 conns", "adv_write_wait_p50_ms", "", nil},
	{"ReadersWriter/hold=2ms", "… writer's wait p99, ms", "write_wait_p99_ms", "advisory shared + exclusive, 9 conns", "adv_write_wait_p99_ms", "", nil},
	{"ReadersWriter/hold=2ms", "… smallest reader share / mean", "min_read_share", "", "", "≥ 0.5", atLeast(0.5)},
	{"ReadersWriter/hold=2ms", "… reads measured (phases end after 20 s)", "count", "", "", "", nil},
	{"SchemaPrevious", "latest schema: Acquire+Release, µs", "latest_us", "the same on the schema before it", "previous_us", "", nil},
	{"SchemaPrevious", "latest schema: 1 key, 8 clients, hold 0: handoffs/s", "latest_handoffs/s", "the same on the schema before it", "previous_handoffs/s", "", nil},
	{"SchemaPrevious", "… latest schema version", "latest_version", "", "", "", nil},
	{"Semaphore8Clients/hold=0s", "semaphore of 4, 8 clients, hold 0: acquisitions/s", "acq/s", "exclusive key, same clients", "excl_acq/s", "", nil},
	{"Semaphore8Clients/hold=0s", "… acquisitions/s", "acq/s", "advisory lock, 8 conns", "adv_acq/s", "", nil},
	{"Semaphore8Clients/hold=0s", "… smallest client share / mean", "min_share", "exclusive key, same clients", "excl_min_share", "≥ 0.5", atLeast(0.5)},
	{"Semaphore8Clients/hold=0s", "… largest client share / mean", "max_share", "", "", "", nil},
	{"Semaphore8Clients/hold=0s", "… acquire statements per acquisition", "acquire_q/acq", "", "", "", nil},
	{"Semaphore8Clients/hold=0s", "… acquisitions measured (phases end after 20 s)", "count", "", "", "", nil},
	{"Semaphore8Clients/hold=2ms", "semaphore of 4, 8 clients, hold 2 ms: acquisitions/s", "acq/s", "exclusive key, same clients", "excl_acq/s", "", nil},
	{"Semaphore8Clients/hold=2ms", "… acquisitions/s", "acq/s", "advisory lock, 8 conns", "adv_acq/s", "", nil},
	{"Semaphore8Clients/hold=2ms", "… smallest client share / mean", "min_share", "exclusive key, same clients", "excl_min_share", "≥ 0.5", atLeast(0.5)},
	{"Semaphore8Clients/hold=2ms", "… largest client share / mean", "max_share", "", "", "", nil},
	{"Semaphore8Clients/hold=2ms", "… acquire statements per acquisition", "acquire_q/acq", "", "", "", nil},
	{"Semaphore8Clients/hold=2ms", "… acquisitions measured (phases end after 20 s)", "count", "", "", "", nil},
}

func main() {
	from := flag.String("from", "", "format this saved `go test -bench` output instead of running the benchmarks")
	out := flag.String("out", "", "also write the raw `go test` output to this file")
	count := flag.Int("count", 1, "runs of each benchmark; the table shows medians")
	pkg := flag.String("pkg", "./lease/", "package with the benchmarks")
	flag.Parse()

	var raw strings.Builder
	if *from != "" {
		b, err := os.ReadFile(*from)
		if err != nil {
			fatal(err)
		}
		raw.Write(b)
	} else {
		for _, r := range runs {
			args := []string{"test", "-run", "^$", "-bench", r.bench, "-benchtime", r.benchtime,
				"-count", strconv.Itoa(*count), "-timeout", "60m", *pkg}
			fmt.Fprintf(os.Stderr, "$ go %s\n", strings.Join(args, " "))
			cmd := exec.Command("go", args...)
			cmd.Stdout = io.MultiWriter(&raw, os.Stderr)
			cmd.Stderr = os.Stderr
			if err := cmd.Run(); err != nil {
				fatal(fmt.Errorf("go %s: %w", strings.Join(args, " "), err))
			}
		}
		if *out != "" {
			if err := os.WriteFile(*out, []byte(raw.String()), 0o644); err != nil {
				fatal(err)
			}
		}
	}
	printTable(os.Stdout, parse(raw.String()))
}

func fatal(err error) {
	fmt.Fprintln(os.Stderr, "benchtable:", err)
	os.Exit(1)
}

// results maps a benchmark name (without "Benchmark" and the -GOMAXPROCS
// suffix) and a metric unit to every value reported.
type results map[string]map[string][]float64

var procSuffix = regexp.MustCompile(`-\d+$`)

func parse(out string) results {
	res := results{}
	sc := bufio.NewScanner(strings.NewReader(out))
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) < 4 || !strings.HasPrefix(f[0], "Benchmark") {
			continue
		}
		if _, err := strconv.Atoi(f[1]); err != nil {
			continue
		}
		name := procSuffix.ReplaceAllString(strings.TrimPrefix(f[0], "Benchmark"), "")
		for i := 2; i+1 < len(f); i += 2 {
			v, err := strconv.ParseFloat(f[i], 64)
			if err != nil {
				continue
			}
			if res[name] == nil {
				res[name] = map[string][]float64{}
			}
			res[name][f[i+1]] = append(res[name][f[i+1]], v)
		}
	}
	return res
}

func (r results) median(bench, metric string) (float64, bool) {
	vs := r[bench][metric]
	if len(vs) == 0 {
		return 0, false
	}
	vs = slices.Clone(vs)
	slices.Sort(vs)
	if len(vs)%2 == 1 {
		return vs[len(vs)/2], true
	}
	return (vs[len(vs)/2-1] + vs[len(vs)/2]) / 2, true
}

func printTable(w io.Writer, res results) {
	fmt.Fprintln(w, "| figure | pglease | raw baseline | baseline | ratio | target | met |")
	fmt.Fprintln(w, "|---|---:|---|---:|---:|---|---|")
	for _, r := range rows {
		v, ok := res.median(r.bench, r.metric)
		if !ok {
			continue
		}
		base, ratio := "", ""
		rv := math.NaN()
		if r.baseMetric != "" {
			if b, ok := res.median(r.bench, r.baseMetric); ok {
				base = num(b)
				if b != 0 {
					rv = v / b
					ratio = fmt.Sprintf("%.2f", rv)
				}
			}
		}
		met := ""
		if r.ok != nil {
			met = "no"
			if r.ok(v, rv) {
				met = "yes"
			}
		}
		fmt.Fprintf(w, "| %s | %s | %s | %s | %s | %s | %s |\n", r.figure, num(v), r.baseName, base, ratio, r.target, met)
	}
}

// num formats a figure with three significant digits or so.
func num(v float64) string {
	switch a := math.Abs(v); {
	case a >= 100:
		return strconv.FormatFloat(v, 'f', 0, 64)
	case a >= 10:
		return strconv.FormatFloat(v, 'f', 1, 64)
	case a >= 1:
		return strconv.FormatFloat(v, 'f', 2, 64)
	default:
		return strconv.FormatFloat(v, 'f', 3, 64)
	}
}
