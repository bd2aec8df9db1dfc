// Command chartcheck decodes every manifest of a rendered Helm chart (multi-document YAML on
// standard input, as `helm template` prints it) strictly into the Kubernetes API types of a
// pinned release, and the Prometheus operator's and KEDA's types for their custom resources: an unknown
// field, a duplicate field or a wrong type is an error naming the manifest. Kinds it has no
// types for are listed and, with -require-all, are errors too.
package main

import (
	"bufio"
	"bytes"
	"flag"
	"fmt"
	"io"
	"os"
	"strings"

	monitoringv1 "github.com/prometheus-operator/prometheus-operator/pkg/apis/monitoring/v1"
	kedav1alpha1 "github.com/kedacore/keda/v2/apis/keda/v1alpha1"
	appsv1 "k8s.io/api/apps/v1"
	autoscalingv2 "k8s.io/api/autoscaling/v2"
	batchv1 "k8s.io/api/batch/v1"
	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	policyv1 "k8s.io/api/policy/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/runtime/serializer/json"
	"sigs.k8s.io/yaml"
)

func scheme() (*runtime.Scheme, error) {
	s := runtime.NewScheme()
	for _, add := range []func(*runtime.Scheme) error{
		appsv1.AddToScheme, autoscalingv2.AddToScheme, batchv1.AddToScheme, corev1.AddToScheme,
		networkingv1.AddToScheme, policyv1.AddToScheme, rbacv1.AddToScheme, monitoringv1.AddToScheme, kedav1alpha1.AddToScheme,
	} {
		if err := add(s); err != nil {
			return nil, err
		}
	}
	return s, nil
}

// documents splits a multi-document YAML stream on `---` lines, dropping empty documents.
func documents(r io.Reader) ([][]byte, error) {
	var out [][]byte
	var cur bytes.Buffer
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 1<<20), 64<<20)
	flush := func() {
		if strings.TrimSpace(stripComments(cur.String())) != "" {
			out = append(out, append([]byte(nil), cur.Bytes()...))
		}
		cur.Reset()
	}
	for sc.Scan() {
		line := sc.Text()
		if strings.HasPrefix(line, "---") {
			flush()
			continue
		}
		cur.WriteString(line)
		cur.WriteByte('\n')
	}
	flush()
	return out, sc.Err()
}

func stripComments(s string) string {
	var b strings.Builder
	for _, l := range strings.Split(s, "\n") {
		if !strings.HasPrefix(strings.TrimSpace(l), "#") {
			b.WriteString(l)
			b.WriteByte('\n')
		}
	}
	return b.String()
}

func main() {
	requireAll := flag.Bool("require-all", false, "fail on a kind without known types")
	flag.Parse()
	s, err := scheme()
	if err != nil {
		fmt.Fprintln(os.Stderr, "chartcheck: building the scheme:", err)
		os.Exit(2)
	}
	strict := json.NewSerializerWithOptions(json.DefaultMetaFactory, s, s,
		json.SerializerOptions{Yaml: true, Strict: true})
	docs, err := documents(os.Stdin)
	if err != nil {
		fmt.Fprintln(os.Stderr, "chartcheck: reading the manifests:", err)
		os.Exit(2)
	}
	failed, checked := 0, 0
	unknown := map[string]int{}
	for i, doc := range docs {
		var head struct {
			APIVersion string `json:"apiVersion"`
			Kind       string `json:"kind"`
			Metadata   struct {
				Name string `json:"name"`
			} `json:"metadata"`
		}
		if err := yaml.Unmarshal(doc, &head); err != nil {
			fmt.Printf("document %d: not YAML: %v\n", i, err)
			failed++
			continue
		}
		name := fmt.Sprintf("%s %s (%s, document %d)", head.Kind, head.Metadata.Name, head.APIVersion, i)
		gvk := schema.FromAPIVersionAndKind(head.APIVersion, head.Kind)
		if !s.Recognizes(gvk) {
			unknown[head.APIVersion+" "+head.Kind]++
			continue
		}
		if _, _, err := strict.Decode(doc, nil, nil); err != nil {
			fmt.Printf("%s: %v\n", name, err)
			failed++
			continue
		}
		checked++
	}
	for k, n := range unknown {
		fmt.Printf("no types for %s (%d manifests)\n", k, n)
		if *requireAll {
			failed++
		}
	}
	fmt.Printf("chartcheck: %d manifests decoded strictly, %d failed, %d kinds without types\n",
		checked, failed, len(unknown))
	if failed > 0 || checked == 0 {
		os.Exit(1)
	}
}
