// Package proxy is a TCP proxy for fault tests between PostgreSQL clients and
// a server on this machine. It can stall all traffic (a blackhole: the
// connections stay open, nothing gets through, as in a network partition with
// TCP retransmitting), delay it, reset every connection, and lose the reply to
// a successful acquire: it lets the server run and commit the acquire, then
// resets the connection instead of passing the reply on.
//
// To recognise an acquire it follows the PostgreSQL wire protocol far enough
// to frame messages: a Parse or simple Query whose text calls the SQL function
// acquire (of schema versions up to 5) or acquire_keys (version 6, which the
// client calls for every table-path acquire), the Bind of such a statement,
// and the server's reply up to its ReadyForQuery. Both return whether they
// acquired in their first column.
package proxy

import (
	"encoding/binary"
	"errors"
	"io"
	"net"
	"strings"
	"sync"
	"time"
)

// Proxy forwards connections from a loopback port to a target address.
type Proxy struct {
	ln     net.Listener
	target string

	mu          sync.Mutex
	links       map[*link]struct{}
	stall       chan struct{} // non-nil while blackholed; closed on heal
	latency     time.Duration
	loseAcquire int // replies of successful acquires still to lose
	lost        int
	stallAfter  time.Duration // blackhole for this long after each lost reply
	closed      bool

	wg sync.WaitGroup
}

// New listens on a free loopback port and forwards to target ("host:port").
func New(target string) (*Proxy, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	p := &Proxy{ln: ln, target: target, links: map[*link]struct{}{}}
	p.wg.Add(1)
	go p.accept()
	return p, nil
}

// Port is the port the proxy listens on (127.0.0.1).
func (p *Proxy) Port() int { return p.ln.Addr().(*net.TCPAddr).Port }

// Blackhole stalls every connection, present and new, in both directions
// until it is called with false.
func (p *Proxy) Blackhole(on bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	switch {
	case on && p.stall == nil:
		p.stall = make(chan struct{})
	case !on && p.stall != nil:
		close(p.stall)
		p.stall = nil
	}
}

// SetLatency delays every chunk of data, in each direction, by d from now on.
func (p *Proxy) SetLatency(d time.Duration) {
	p.mu.Lock()
	p.latency = d
	p.mu.Unlock()
}

// Reset closes every current connection with a TCP reset and returns how many
// it closed.
func (p *Proxy) Reset() int {
	p.mu.Lock()
	links := make([]*link, 0, len(p.links))
	for l := range p.links {
		links = append(links, l)
	}
	p.mu.Unlock()
	for _, l := range links {
		l.reset()
	}
	return len(links)
}

// LoseAcquireReplies makes the proxy lose the replies of the next n acquires
// that succeed: the acquire commits, its client gets a connection reset.
func (p *Proxy) LoseAcquireReplies(n int) {
	p.mu.Lock()
	p.loseAcquire = n
	p.mu.Unlock()
}

// BlackholeAfterLoss makes every lost acquire reply be followed by a
// blackhole of d (0: none) that ends with every connection reset, its stalled
// data discarded: as when the network fails right after the acquire
// committed, so that the client's clean-up of the orphan row fails too.
func (p *Proxy) BlackholeAfterLoss(d time.Duration) {
	p.mu.Lock()
	p.stallAfter = d
	p.mu.Unlock()
}

// LostReplies returns how many acquire replies were lost so far.
func (p *Proxy) LostReplies() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.lost
}

// Close stops listening, resets every connection and waits for the proxy's
// goroutines to end.
func (p *Proxy) Close() {
	p.mu.Lock()
	p.closed = true
	if p.stall != nil {
		close(p.stall)
		p.stall = nil
	}
	p.mu.Unlock()
	_ = p.ln.Close()
	p.Reset()
	p.wg.Wait()
}

func (p *Proxy) accept() {
	defer p.wg.Done()
	for {
		c, err := p.ln.Accept()
		if err != nil {
			return
		}
		s, err := net.DialTimeout("tcp", p.target, 5*time.Second)
		if err != nil {
			_ = c.Close()
			continue
		}
		l := &link{p: p, c: c.(*net.TCPConn), s: s.(*net.TCPConn), done: make(chan struct{}),
			armed: map[int]bool{}, stmts: map[string]bool{}}
		p.mu.Lock()
		if p.closed {
			p.mu.Unlock()
			l.reset()
			return
		}
		p.links[l] = struct{}{}
		p.mu.Unlock()
		p.wg.Add(1)
		go l.run()
	}
}

// waitStall blocks while the proxy is blackholed. It returns false if the
// link was closed meanwhile.
func (p *Proxy) waitStall(l *link) bool {
	for {
		p.mu.Lock()
		ch := p.stall
		p.mu.Unlock()
		if ch == nil {
			return true
		}
		select {
		case <-ch:
		case <-l.done:
			return false
		}
	}
}

func (p *Proxy) delay() time.Duration {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.latency
}

// takeLoss reports whether the reply of a successful acquire should be lost,
// and counts it.
func (p *Proxy) takeLoss() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.loseAcquire == 0 {
		return false
	}
	p.loseAcquire--
	p.lost++
	if d := p.stallAfter; d > 0 && p.stall == nil {
		ch := make(chan struct{})
		p.stall = ch
		time.AfterFunc(d, func() {
			p.Reset() // still stalled: nothing more gets through
			p.mu.Lock()
			defer p.mu.Unlock()
			if p.stall == ch {
				close(ch)
				p.stall = nil
			}
		})
	}
	return true
}

// link is one proxied connection: c is the client's side, s the server's.
type link struct {
	p    *Proxy
	c, s *net.TCPConn

	once sync.Once
	done chan struct{}

	mu       sync.Mutex
	stmts    map[string]bool // prepared statement name → calls acquire
	pending  bool            // an acquire Bind was seen; its Sync arms the reply
	syncs    int             // Syncs and simple Queries sent by the client
	armed    map[int]bool    // replies (by ReadyForQuery count) that answer an acquire
	sslReply bool            // the server's next byte answers an SSL or GSS request
}

type chunk struct {
	at   time.Time
	data []byte
}

func (l *link) run() {
	defer l.p.wg.Done()
	var wg sync.WaitGroup
	up := make(chan chunk, 256)
	down := make(chan chunk, 256)
	wg.Add(4)
	go func() { defer wg.Done(); l.read(l.c, up, l.frontend()) }()
	go func() { defer wg.Done(); l.write(l.s, up) }()
	go func() { defer wg.Done(); l.read(l.s, down, l.backend()) }()
	go func() { defer wg.Done(); l.write(l.c, down) }()
	wg.Wait()
	l.p.mu.Lock()
	delete(l.p.links, l)
	l.p.mu.Unlock()
}

// close ends the link; with rst, both sides get a TCP reset.
func (l *link) close(rst bool) {
	l.once.Do(func() {
		if rst {
			_ = l.c.SetLinger(0)
			_ = l.s.SetLinger(0)
		}
		_ = l.c.Close()
		_ = l.s.Close()
		close(l.done)
	})
}

func (l *link) reset() { l.close(true) }

// read copies from src to out, passing each chunk through filter, which
// returns what to forward (nil: nothing) or ok=false to reset the link.
func (l *link) read(src *net.TCPConn, out chan<- chunk, filter func([]byte) ([]byte, bool)) {
	defer close(out)
	buf := make([]byte, 32<<10)
	for {
		if !l.p.waitStall(l) {
			return
		}
		n, err := src.Read(buf)
		if n > 0 {
			data, ok := filter(append([]byte(nil), buf[:n]...))
			if !ok {
				l.close(true)
				return
			}
			if len(data) > 0 {
				select {
				case out <- chunk{at: time.Now().Add(l.p.delay()), data: data}:
				case <-l.done:
					return
				}
			}
		}
		if err != nil {
			if !errors.Is(err, io.EOF) {
				l.close(true)
			} else {
				l.close(false)
			}
			return
		}
	}
}

func (l *link) write(dst *net.TCPConn, in <-chan chunk) {
	for c := range in {
		if d := time.Until(c.at); d > 0 {
			t := time.NewTimer(d)
			select {
			case <-t.C:
			case <-l.done:
				t.Stop()
				return
			}
		}
		if !l.p.waitStall(l) {
			return
		}
		if _, err := dst.Write(c.data); err != nil {
			l.close(true)
			return
		}
	}
}

// Protocol codes of untyped startup-phase messages.
const (
	codeSSLRequest = 80877103
	codeGSSENC     = 80877104
	codeCancel     = 80877102
)

// frontend returns the filter of the client's stream: it frames messages and
// arms the reply of every acquire. It forwards everything.
func (l *link) frontend() func([]byte) ([]byte, bool) {
	var buf []byte
	startup := true
	return func(b []byte) ([]byte, bool) {
		buf = append(buf, b...)
		for {
			if startup {
				if len(buf) < 8 {
					return b, true
				}
				n := int(binary.BigEndian.Uint32(buf))
				if n < 8 || len(buf) < n {
					return b, true
				}
				code := binary.BigEndian.Uint32(buf[4:])
				buf = buf[n:]
				switch code {
				case codeSSLRequest, codeGSSENC:
					l.mu.Lock()
					l.sslReply = true
					l.mu.Unlock()
				case codeCancel:
					return b, true
				default:
					// The startup message is answered up to a
					// ReadyForQuery, as a Sync is.
					startup = false
					l.mu.Lock()
					l.syncs++
					l.mu.Unlock()
				}
				continue
			}
			if len(buf) < 5 {
				return b, true
			}
			n := int(binary.BigEndian.Uint32(buf[1:]))
			if n < 4 || len(buf) < 1+n {
				return b, true
			}
			typ, body := buf[0], buf[5:1+n]
			buf = buf[1+n:]
			l.frontendMessage(typ, body)
		}
	}
}

func isAcquire(query string) bool {
	return strings.Contains(query, ".acquire(") || strings.Contains(query, ".acquire_keys(")
}

func (l *link) frontendMessage(typ byte, body []byte) {
	l.mu.Lock()
	defer l.mu.Unlock()
	switch typ {
	case 'P': // Parse: name, query, ...
		name, rest := cstring(body)
		query, _ := cstring(rest)
		l.stmts[name] = isAcquire(query)
	case 'B': // Bind: portal, statement, ...
		_, rest := cstring(body)
		stmt, _ := cstring(rest)
		if l.stmts[stmt] {
			l.pending = true
		}
	case 'S': // Sync
		l.syncs++
		if l.pending {
			l.armed[l.syncs] = true
			l.pending = false
		}
	case 'Q': // simple Query
		l.syncs++
		query, _ := cstring(body)
		if isAcquire(query) {
			l.armed[l.syncs] = true
		}
	}
}

// backend returns the filter of the server's stream: it holds back the reply
// to an armed acquire until its ReadyForQuery, then forwards it, or, if the
// acquire succeeded and a loss is wanted, drops it and resets the link.
func (l *link) backend() func([]byte) ([]byte, bool) {
	var buf, held []byte
	ready := 0 // ReadyForQuery messages seen
	acquired := false
	return func(b []byte) ([]byte, bool) {
		buf = append(buf, b...)
		var out []byte
		l.mu.Lock()
		if l.sslReply && len(buf) > 0 {
			l.sslReply = false
			out = append(out, buf[0])
			buf = buf[1:]
		}
		l.mu.Unlock()
		for len(buf) >= 5 {
			n := int(binary.BigEndian.Uint32(buf[1:]))
			if len(buf) < 1+n {
				break
			}
			msg := buf[:1+n]
			buf = buf[1+n:]
			l.mu.Lock()
			armed := l.armed[ready+1]
			l.mu.Unlock()
			if !armed {
				out = append(out, msg...)
				if msg[0] == 'Z' {
					ready++
				}
				continue
			}
			held = append(held, msg...)
			switch msg[0] {
			case 'D':
				acquired = acquired || firstColumnTrue(msg[5:])
			case 'Z':
				l.mu.Lock()
				delete(l.armed, ready+1)
				l.mu.Unlock()
				ready++
				if acquired && l.p.takeLoss() {
					return nil, false
				}
				out = append(out, held...)
				held, acquired = nil, false
			}
		}
		return out, true
	}
}

// firstColumnTrue reports whether a DataRow's first column is boolean true,
// in binary (1) or text ("t") format.
func firstColumnTrue(body []byte) bool {
	if len(body) < 6 || binary.BigEndian.Uint16(body) == 0 {
		return false
	}
	n := int32(binary.BigEndian.Uint32(body[2:]))
	if n != 1 || len(body) < 7 {
		return false
	}
	return body[6] == 1 || body[6] == 't'
}

func cstring(b []byte) (string, []byte) {
	for i, c := range b {
		if c == 0 {
			return string(b[:i]), b[i+1:]
		}
	}
	return string(b), nil
}
